"""Internal machinery shared by every family: extension loading, op registration."""
