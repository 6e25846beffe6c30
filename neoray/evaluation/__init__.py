"""Evaluation and inference: COCO metrics of a model on batches (coco_eval), a trained or pretrained
detector loaded for use (inference), detections drawn on images (visualize)."""
