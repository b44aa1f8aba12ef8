"""Learning the scales: generated retrieval data, training, and planning its memory."""
