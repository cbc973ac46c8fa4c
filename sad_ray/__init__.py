"""sad-ray: Structured Agent Distillation on Ray."""
