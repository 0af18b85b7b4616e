"""The checkpoint producer: finetune config, the run, the training loop, tasks, corruptions."""
