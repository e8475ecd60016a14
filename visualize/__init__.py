"""Drawing and export of depgraph dependency graphs."""
