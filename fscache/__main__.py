import sys

from .mount import main

sys.exit(main())
