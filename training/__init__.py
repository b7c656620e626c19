"""The chat fine-tuning job behind train.py: config, data, loop, checkpoints."""
