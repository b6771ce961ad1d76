"""Object detection: RetinaNet and YOLOv1 on ResNets, PASCAL VOC, COCO and built-in shapes; COCO/VOC mAP."""
