"""4M masked multimodal model family: masking, network, LightningModule."""
