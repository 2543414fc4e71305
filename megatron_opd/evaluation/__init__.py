"""Evaluation: accuracy on math sets, the held-out gap to the teacher, grading, plots."""
