"""Per-image analysis: spot finding on detector images."""
