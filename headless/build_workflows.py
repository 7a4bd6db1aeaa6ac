"""Writes example_workflows/*.json (ComfyUI's UI format, what users load and share; the host lists them as the
pack's templates, titled by their file names) from the specs below,
taking widget order and output types from the installed nodes' own INPUT_TYPES / RETURN_TYPES.

    .venv/bin/python headless/build_workflows.py [--thumbnails]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from comfy_rapm import presets  # noqa: E402
from headless.convert import spec_entries, widget_slots  # noqa: E402

SD15_PROMPTS = """# One prompt per line; the paper used 1,000 prompts (CC3M captions). Put a long list in a text
# file in ComfyUI's input folder and name it in prompts_file.
a photo of a cat sitting on a windowsill
a watercolor painting of a lighthouse at dawn
a portrait of an old man, dramatic light
a bowl of fruit on a wooden table
a red sports car on a mountain road
an astronaut riding a horse in the forest
a teddy bear on a skateboard in times square
a cozy cabin in the snow at night
a goat wearing headphones
a city street in the rain, neon signs"""

DEMO_PROMPTS = """# The built-in emoji teacher knows captions "<emoji name>, <style> style",
# styles: twitter, google, fluent 3d.
grinning face, twitter style
red apple, google style
smiling face with sunglasses, fluent 3d style
cat face, twitter style
thumbs up, google style
sun, twitter style"""


# What the front end's missing-models dialog offers to download (the names and addresses ComfyUI's own templates use).
CHECKPOINTS = {
    "v1-5-pruned-emaonly-fp16.safetensors":
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors?download=true",
    "sd_xl_base_1.0.safetensors":
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors?download=true",
}


def pipeline(ckpt, size, prompts, count, fine_steps, cfg, batch_size, train, teacher_steps, name, notes,
             sample_prompt="a photo of a cat sitting on a windowsill", latent_size=None):
    """The whole precompute → distill → sample graph. `ckpt` None: the built-in emoji demo teacher,
    whose latent is the image (Empty Latent Image's size is then 8× the model's)."""
    loader = (dict(id=1, type="CheckpointLoaderSimple", title="Teacher checkpoint", pos=(0, 0), widgets={"ckpt_name": ckpt},
                   models=[{"name": ckpt, "url": CHECKPOINTS[ckpt], "directory": "checkpoints"}])
              if ckpt else dict(id=1, type="RAPMEmojiDemoLoader", title="Teacher (built-in emoji model)", pos=(0, 0)))
    latent_size = latent_size or size
    return [
        loader,
        dict(id=2, type="RAPMTeacherTrajectory", pos=(460, 0), size=(400, 640), inputs={"model": (1, 0), "clip": (1, 1)},
             widgets=dict(prompts=prompts, negative_prompt="", width=size, height=size, count=count, steps=4,
                          fine_steps=fine_steps, cfg=cfg, seed=0, batch_size=batch_size, name=name, prompts_file="",
                          solver="ddim")),
        dict(id=3, type="RAPMTrain", pos=(920, 0), size=(400, 640), inputs={"model": (1, 0), "trajectories": (2, 0)},
             widgets=dict(train, delta=0, absolute_weight="1.0", huber_c=0.001, adversarial_weight=0.1, mode="rapm",
                          seed=0, name=name)),
        dict(id=4, type="RAPMSaveLoRA", pos=(1380, 0), inputs={"lora": (3, 1)},
             widgets={"filename_prefix": f"rapm/{name}", "key_format": "comfyui"}),
        dict(id=5, type="LossGraphNode", pos=(1380, 280), inputs={"loss": (3, 2)}, widgets={"filename_prefix": f"rapm_{name}_loss"}),
        dict(id=6, type="CLIPTextEncode", title="Sample prompt", pos=(460, 720), inputs={"clip": (1, 1)},
             widgets={"text": sample_prompt}),
        dict(id=7, type="CLIPTextEncode", title="Negative (teacher only)", pos=(460, 980), inputs={"clip": (1, 1)},
             widgets={"text": ""}),
        dict(id=8, type="EmptyLatentImage", pos=(460, 1240), widgets={"width": latent_size, "height": latent_size, "batch_size": 4}),
        dict(id=9, type="RAPMSampler", title="Student (4 steps, cfg 1)", pos=(920, 720),
             inputs={"model": (3, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)},
             widgets={"seed": 42, "steps": 4, "cfg": 1.0}),
        dict(id=10, type="RAPMSampler", title=f"Teacher ({teacher_steps} DDIM steps, cfg {cfg})", pos=(920, 980),
             inputs={"model": (1, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (8, 0)},
             widgets={"seed": 42, "steps": teacher_steps, "cfg": cfg}),
        dict(id=11, type="VAEDecode", title="Decode student", pos=(1380, 720), inputs={"samples": (9, 0), "vae": (1, 2)}),
        dict(id=12, type="VAEDecode", title="Decode teacher", pos=(1380, 980), inputs={"samples": (10, 0), "vae": (1, 2)}),
        dict(id=13, type="SaveImage", title="Student image", pos=(1840, 720), size=(360, 320), inputs={"images": (11, 0)},
             widgets={"filename_prefix": f"rapm/{name}_student"}),
        dict(id=14, type="ImageStitch", title="Teacher | student", pos=(1840, 1100), inputs={"image1": (12, 0), "image2": (11, 0)},
             widgets={"direction": "right", "match_image_size": True, "spacing_width": 8, "spacing_color": "white"}),
        dict(id=15, type="SaveImage", title="Teacher vs student", pos=(2300, 1100), size=(360, 320), inputs={"images": (14, 0)},
             widgets={"filename_prefix": f"rapm/{name}_teacher_vs_student"}),
        dict(id=16, type="Note", title="How this works", pos=(0, 280), size=(400, 520), widgets={"text": notes}),
    ]


WHERE_FILES_GO = """Files: the teacher checkpoint goes in models/checkpoints/ (the missing-models dialog offers the download). The pack writes output/rapm_trajectories/<name>/ (trajectories), output/rapm_runs/<name>/ (checkpoints; queue again with the same name to resume after Cancel or a crash) and models/loras/rapm/<name>.safetensors (the LoRA). Use the LoRA in any workflow with a LoRA loader and KSampler: sampler euler, scheduler simple, 4 steps, cfg 1."""

SD15_NOTE = f"""RAPM distillation of an SD1.5 model into a 4-step LoRA (paper: 'High Quality Diffusion Distillation on a Single GPU with Relative and Absolute Position Matching').

1. Teacher Trajectories: 1,000 trajectories, N=4 coarse steps × M=25 DDIM steps each, teacher cfg 6 (batch_size 0 = auto; lower it if the teacher runs out of memory).
2. RAPM Train: 20,000 iterations at batch 1 with PCM's settings (LoRA rank 64 alpha 8, lr 5e-6, weight decay 1e-3, discriminator lr 1e-5, Δ 20, adversarial weight 0.1). Defaults fit a 16 GB card; on a 12 GB card set discriminator_heads to 1x1, and only if that still runs out, low_memory (about 1.7x slower). Speeds: README, Speed and memory.
3. The comparison image shows the teacher (100 DDIM steps) and the student (4 steps) from the same seed.

{WHERE_FILES_GO}"""

SDXL_NOTE = f"""RAPM distillation of SDXL into a 4-step LoRA.

PCM's SDXL settings: teacher cfg 7.5, lr 2e-6, weight decay 0, Δ 25, 1024×1024, 1,000 trajectories. The defaults fit a 24 GB card; on a 16 GB card also turn on low_memory (about 1.3x slower). Speeds: README, Speed and memory.

{WHERE_FILES_GO}"""

DEMO_NOTE = """The whole RAPM pipeline on the built-in emoji teacher (11M parameters, 32×32 pixels, text from MiniLM; no download): 8 trajectories, 40 training iterations, a couple of minutes on a CPU.
The model's latent is the image, so Empty Latent Image asks for 256×256 (32×32 after its ÷8) while the trajectories are 32×32.
The comparison image shows the teacher (20 DDIM steps, cfg 6) and the 4-step student from the same seed. The pack writes output/rapm_trajectories/demo/, output/rapm_runs/demo/ and models/loras/rapm/demo.safetensors. Load the SD1.5 or SDXL template for the real thing."""

def family_training(preset):
    """RAPM Train's widgets for a family: its preset's values, written out so the user sees them."""
    return dict(iterations=preset.iterations, lora_rank=preset.lora_rank, lora_alpha=preset.lora_alpha,
                learning_rate=preset.learning_rate, discriminator_learning_rate=preset.discriminator_learning_rate,
                checkpoint_every=500, weight_decay=preset.weight_decay, gradient_checkpointing=True, low_memory=False,
                precision="auto", discriminator_heads="auto")


WORKFLOWS = {
    "rapm-2-sd15-to-4-step-lora.json": pipeline(
        "v1-5-pruned-emaonly-fp16.safetensors", presets.SD15.resolution, SD15_PROMPTS, 1000, 25, presets.SD15.teacher_cfg, 0,
        family_training(presets.SD15), 100, "sd15_rapm", SD15_NOTE),
    "rapm-3-sdxl-to-4-step-lora.json": pipeline(
        "sd_xl_base_1.0.safetensors", presets.SDXL.resolution, SD15_PROMPTS, 1000, 25, presets.SDXL.teacher_cfg, 0,
        family_training(presets.SDXL), 100, "sdxl_rapm", SDXL_NOTE),
    "rapm-1-demo-emoji-teacher-no-downloads.json": pipeline(
        None, 32, DEMO_PROMPTS, 8, 5, 6.0, 4,
        dict(iterations=40, lora_rank=8, lora_alpha=8.0, learning_rate=1e-4, discriminator_learning_rate=1e-4,
             checkpoint_every=20, weight_decay=0.001, gradient_checkpointing=False, low_memory=False, precision="auto",
             discriminator_heads="auto"),
        20, "demo", DEMO_NOTE, sample_prompt="grinning face, twitter style", latent_size=256),
}


def to_ui(specs, classes):
    nodes, links = [], []
    link_id = 0
    outgoing = {}
    for order, spec in enumerate(specs):
        if spec["type"] == "Note":
            continue
        for input_name, (src, slot) in spec.get("inputs", {}).items():
            link_id += 1
            outgoing.setdefault((src, slot), []).append(link_id)
            spec.setdefault("_links", {})[input_name] = link_id
    for order, spec in enumerate(specs):
        ui = {"id": spec["id"], "type": spec["type"], "pos": list(spec["pos"]), "size": list(spec.get("size", (360, 200))),
              "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [],
              "properties": {"Node name for S&R": spec["type"]}, "widgets_values": []}
        if spec.get("title"):
            ui["title"] = spec["title"]
        if spec.get("models"):
            ui["properties"]["models"] = spec["models"]
        if spec["type"] == "Note":
            ui["widgets_values"] = [spec["widgets"]["text"]]
            nodes.append(ui)
            continue
        cls = classes[spec["type"]]
        slots = widget_slots(cls)
        for name in slots:
            if name == "control_after_generate":
                ui["widgets_values"].append("fixed")
            elif name not in spec.get("widgets", {}):
                raise KeyError(f"{spec['type']}: no value for widget {name}")
            else:
                ui["widgets_values"].append(spec["widgets"][name])
        for name, kind, opts in spec_entries(cls):
            link = spec.get("_links", {}).get(name)
            if name not in slots and link is not None:
                ui["inputs"].append({"name": name, "type": kind if isinstance(kind, str) else "COMBO", "link": link})
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        for slot, (out_name, out_type) in enumerate(zip(names, cls.RETURN_TYPES)):
            ids = outgoing.get((spec["id"], slot), [])
            ui["outputs"].append({"name": out_name, "type": out_type, "links": ids, "slot_index": slot})
            for lid in ids:
                target = next(s for s in specs if lid in s.get("_links", {}).values())
                target_input = next(n for n, i in target["_links"].items() if i == lid)
                target_slot = [x["name"] for x in _ui_link_inputs(target, classes)].index(target_input)
                links.append([lid, spec["id"], slot, target["id"], target_slot, out_type])
        nodes.append(ui)
    links.sort()
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": link_id, "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [0, 0]}}, "version": 0.4}


def _ui_link_inputs(spec, classes):
    cls = classes[spec["type"]]
    return [{"name": n} for n, _, _ in spec_entries(cls) if n not in widget_slots(cls) and n in spec.get("_links", {})]


THUMBNAIL_SIZE = (640, 400)
# The card's picture: its graph, and what it does in two lines (the front end titles the card by the file name).
THUMBNAIL_CAPTIONS = {
    "rapm-1-demo-emoji-teacher-no-downloads": ("Demo: distill the built-in emoji teacher", "no downloads, minutes on a CPU"),
    "rapm-2-sd15-to-4-step-lora": ("SD1.5 to a 4-step LoRA", "trajectories, RAPM training, LoRA file"),
    "rapm-3-sdxl-to-4-step-lora": ("SDXL to a 4-step LoRA", "trajectories, RAPM training, LoRA file"),
}


def thumbnails(folder: Path) -> None:
    """<name>.jpg beside each workflow, the picture the template browser shows on its card: the graph as the real
    front end draws it (ComfyUI's server on the CPU, headless Chromium) under a caption."""
    import tempfile
    from PIL import Image, ImageDraw, ImageFont
    from headless import frontend
    from headless.comfy_host import serve
    left, top = 72, 110  # below the front end's tab bar, right of its side bar
    width, height = frontend.VIEWPORT["width"] - left, frontend.VIEWPORT["height"] - top - 80
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        args = ["--cpu", "--user-directory", str(frontend.user_directory(tmp)), "--output-directory", str(tmp / "out"),
                "--disable-api-nodes"]
        with serve(args, tmp / "server.log") as url, frontend.open_page(url, tmp / "profile") as page:
            for path in sorted(folder.glob("*.json")):
                frontend.load_workflow(page, json.loads(path.read_text()))
                frontend.close_dialogs(page)  # the missing-models dialog: the picture is of the graph
                frontend.fit_graph(page, left=left + 16, top=top + 170, margin=24)
                shot = tmp / (path.stem + ".png")
                page.screenshot(path=str(shot), clip={"x": left, "y": top, "width": width, "height": height})
                image = Image.open(shot).convert("RGB")
                image.thumbnail(THUMBNAIL_SIZE, Image.LANCZOS)
                draw = ImageDraw.Draw(image)
                draw.rectangle([0, 0, image.width, 64], fill=(24, 24, 28))
                title, subtitle = THUMBNAIL_CAPTIONS[path.stem]
                draw.text((14, 6), title, fill=(240, 240, 240), font=ImageFont.load_default(size=30))
                draw.text((14, 40), subtitle, fill=(170, 170, 180), font=ImageFont.load_default(size=18))
                image.save(path.with_suffix(".jpg"), quality=85, optimize=True)
                print("wrote", path.with_suffix(".jpg"))


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thumbnails", action="store_true", help="also draw each workflow's template thumbnail (.jpg)")
    args = parser.parse_args(argv)
    from headless.comfy_host import boot
    nodes = boot(cpu=True)
    out = REPO / "example_workflows"
    out.mkdir(exist_ok=True)
    for filename, specs in WORKFLOWS.items():
        workflow = to_ui([dict(s) for s in specs], nodes.NODE_CLASS_MAPPINGS)
        (out / filename).write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", out / filename)
    if args.thumbnails:
        thumbnails(out)


if __name__ == "__main__":
    main()
