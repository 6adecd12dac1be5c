"""One module per container runtime, each a pure planner from desired mirrors to file contents."""
