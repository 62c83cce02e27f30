"""The demo as a library call: its stages in order, the weights probe before any work, and what it reuses."""

import json
import shutil

from cachedseg.dataset import open_dataset
from cachedseg.demo import STAGES, DemoConfig, DemoSteps, demo


class Recorded(DemoSteps):
    """The library's own stages, recorded; the report is left out (seconds of drawing, owned by test_report)."""

    def __init__(self):
        self.calls = []

    def stage(self, number, title):
        self.calls.append(("stage", number, title))

    def fallback(self, reason):
        self.calls.append(("fallback", reason))

    def reuse(self, data):
        self.calls.append(("reuse", data))

    def synth(self, *args):
        self.calls.append(("synth",))
        return super().synth(*args)

    def predict(self, images, run, out, **options):
        self.calls.append(("predict", [p.stem for p in images]))
        return super().predict(images, run, out, **options)

    def report(self, run, device):
        self.calls.append(("report", run))
        return run / "report.html"


def test_offline_the_demo_falls_back_to_random_weights_and_reuses_its_data(dataset, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "no-hf-cache"))
    out = tmp_path / "demo"
    shutil.copytree(dataset, out / "data")  # an earlier demo's dataset
    (out / "run").mkdir(parents=True)
    (out / "run" / "stale.txt").write_text("an earlier run's file")
    steps = Recorded()
    config = DemoConfig(backbone="vit_small_patch14_dinov2", image_size="112", epochs=1, device="cpu")
    result = demo(out, config, steps)

    assert result.weights == "random" and steps.calls[0][0] == "fallback"  # probed before the first stage
    assert "--weights random" in steps.calls[0][1]
    assert [c[1] for c in steps.calls if c[0] == "stage"] == list(range(1, len(STAGES) + 1))
    assert ("reuse", out / "data") in steps.calls and ("synth",) not in steps.calls
    val = open_dataset(out / "data").ids("val")
    assert ("predict", val[:4]) in steps.calls and [p.image.stem for p in result.predictions] == val[:4]
    assert result.backbone.image_size == (112, 112) and len(result.rows) == 1
    assert not (out / "run" / "stale.txt").exists() and (out / "run" / "best.pt").is_file()  # a new run
    assert json.loads((out / "evaluation.json").read_text())["miou"] == result.evaluation.miou
    assert result.run == out / "run" and result.report == out / "run" / "report.html"
