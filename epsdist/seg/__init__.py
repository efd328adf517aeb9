"""The segmentation stage (``epsdist/segment.py``): DeepLab networks (``models``), the
training step and its checks (``step``) and validation on ground-truth shards (``eval``)."""
