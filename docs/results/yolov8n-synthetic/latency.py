# Re-timing of the checkpoints of the two `slimcore yolo` runs and the dense baseline, one call, interleaved.
import json, sys, torch
from slimcore.integrations.ultralytics import load_yolo, measure_latency
models = {"dense (baseline, lam=0)": "/tmp/res/base150/train/weights/last.pt",
          "slim lam=3e-2 (pruned 0.5)": "/tmp/res/yolov8n-3e-2/finetuned.pt",
          "slim lam=5e-2 (pruned 0.5)": "/tmp/res/yolov8n-5e-2/finetuned.pt"}
models = {k: load_yolo(v) for k, v in models.items()}
out = {}
for imgsz, rounds, calls in ((64, 15, 10), (640, 7, 5)):
    for threads in (1, 2):
        out[f"{imgsz}px-{threads}threads"] = measure_latency(models, imgsz, rounds=rounds, calls=calls, threads=threads)
json.dump(out, open(sys.argv[1], "w"), indent=2)
for k, v in out.items():
    print(k, {n: f"{r['median_ms']:.2f} [{r['q1_ms']:.2f}, {r['q3_ms']:.2f}]" for n, r in v.items()})
