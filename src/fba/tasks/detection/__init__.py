"""Detection: RetinaNet and YOLOv1 on ResNets, trained from scratch; COCO mAP."""
