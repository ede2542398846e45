"""Reference data recorded from the original, and the scripts that record and compare it."""
