"""What a job runs on: process groups, checkpoints, failures, the command line's exits, logs."""
