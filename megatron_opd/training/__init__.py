"""Training: the flags, the launch, the OPD step, teachers, prompt data, the loop, resume."""
