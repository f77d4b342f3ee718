"""Proactive offload: a controller that pushes a memory cgroup into swap and finds its working set."""
