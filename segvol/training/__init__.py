"""Fine-tuning the decoder: its numerics, model versions, torch.distributed and the round bench."""
