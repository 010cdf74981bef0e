# Dense baseline: YOLOv8n trained without the penalty for 150 epochs (= 100 sparsity + 50 fine-tuning
# epochs of the slimmed runs) on the same synthetic set (/tmp/res/yolov8n/data: make_synthetic_detection
# with seed 0, 256 train / 64 val images, 64x64, 3 classes: identical to the runs' OUT/data).
from ultralytics import YOLO

from slimcore.integrations.ultralytics import slim_trainer

YOLO("yolov8n.yaml").train(trainer=slim_trainer(lam=0), data="/tmp/res/yolov8n/data/data.yaml", epochs=150, imgsz=64,
                           batch=16, workers=0, device="cpu", project="/tmp/res/base150", name="train", exist_ok=True,
                           plots=False, optimizer="SGD", lr0=0.01, verbose=False, amp=False, seed=0)
