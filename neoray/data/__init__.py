"""Data: synthetic dataset, COCO/YOLO sources, letterbox geometry, Parquet shards, Ray Data streams."""
