"""The real ComfyUI server (main.py --cpu) serves the pack's nodes and runs RAPMSampler over HTTP."""
import json
import time
import urllib.request

import pytest

from comfy_server import get_json as _get, post_json as _post, running_server
from headless import tiny_models

pytestmark = pytest.mark.server


def test_server_lists_the_nodes_and_runs_rapm_sampler(tmp_path):
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    tiny_models.make_sd15_checkpoint(str(models / "checkpoints" / "tiny.safetensors"))
    paths = tmp_path / "extra_model_paths.yaml"
    paths.write_text(f"test:\n  base_path: {models}\n  checkpoints: checkpoints\n")
    out = tmp_path / "output"
    with running_server(tmp_path, "--output-directory", str(out), "--extra-model-paths-config", str(paths)) as base:
        info = _get(f"{base}/object_info/RAPMSampler")
        assert "RAPMSampler" in info
        assert info["RAPMSampler"]["input"]["required"]["steps"][1]["default"] == 4
        # the pack's example_workflows/ folder is served as its templates in the template browser
        templates = _get(f"{base}/workflow_templates")
        assert sorted(templates.get("comfy-rapm", [])) == ["rapm-1-demo-emoji-teacher-no-downloads", "rapm-2-sd15-to-4-step-lora", "rapm-3-sdxl-to-4-step-lora"]
        with urllib.request.urlopen(f"{base}/api/workflow_templates/comfy-rapm/rapm-2-sd15-to-4-step-lora.json", timeout=5) as r:
            assert any(n["type"] == "RAPMTrain" for n in json.loads(r.read())["nodes"])
        for name in templates["comfy-rapm"]:  # each card's picture
            with urllib.request.urlopen(f"{base}/api/workflow_templates/comfy-rapm/{name}.jpg", timeout=5) as r:
                assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"

        prompt = {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red apple"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "5": {"class_type": "RAPMSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                          "latent_image": ["4", 0], "seed": 1, "steps": 4, "cfg": 1.0}},
            "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
            "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "rapm_server"}},
        }
        prompt_id = _post(f"{base}/prompt", {"prompt": prompt})["prompt_id"]
        for _ in range(240):
            history = _get(f"{base}/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed"):
                break
            if prompt_id in history and history[prompt_id].get("status", {}).get("status_str") == "error":
                pytest.fail(json.dumps(history[prompt_id]["status"])[:3000])
            time.sleep(0.5)
        else:
            pytest.fail("prompt did not finish:\n" + (tmp_path / "server.log").read_text()[-3000:])
        images = history[prompt_id]["outputs"]["7"]["images"]
        assert images and (out / images[0]["subfolder"] / images[0]["filename"]).is_file()
