"""Plain PyTorch modules of GLSCL: encoders, fusion, objectives. Nothing here knows of DeepSpeed or data loading."""
