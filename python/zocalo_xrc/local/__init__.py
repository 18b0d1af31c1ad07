"""Local Zocalo: the whole loop from trigger to result on one machine (dispatcher, recipes, ISPyB, simulated per-image analysis, the XRC service)."""
