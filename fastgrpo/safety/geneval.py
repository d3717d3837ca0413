"""GenEval (Ghosh et al. 2023): compositional quality judged by an object detector and a zero-shot colour classifier.

The protocol is GenEval's own (djghosh13/geneval, `evaluation/evaluate_images.py` at 16f1681 and
`evaluation/summary_scores.py` at d927da8), re-implemented on maintained libraries:

- **Prompts**: GenEval's metadata, one JSON object per line: `prompt`, `tag` (one of TAGS), `include` (a list of
  `{"class", "count", "color"?, "position"?: [relation, index of an earlier include]}`) and optional `exclude`
  (`{"class", "count"}`). Classes are GenEval's names of the 80 COCO classes (CLASSES).
- **Detections**: per class, the detector's instances scoring above 0.3 (0.9 for `counting` prompts), most confident
  first, at most 16.
- **An image is correct** when every include holds (at least `count` instances; the `count` most confident ones all
  of the asked colour; each of them in the asked relation to every instance the referenced include matched) and no
  exclude does (fewer than `count` instances).
- **Colour**: CLIP ViT-L/14 zero-shot over COLORS with GenEval's three templates, on the instance's box crop with
  everything outside its mask painted grey (#999).
- **Position**: box centres, each offset shrunk by 0.1 x the two boxes' summed sizes; a relation holds when its
  axis carries more than half of the (unshrunk) offset's length.
- **Score**: a task's accuracy is the mean over its images; `overall` is the mean of the task accuracies.

The detector is transformers' Mask2Former (COCO instance segmentation, from a local directory) where GenEval runs
mmdet's Mask2Former Swin-S: scores are comparable with, not identical to, the official numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from fastgrpo.errors import DataError, ModelLoadError

# GenEval's object_names.txt: the 80 COCO classes in COCO's order, three of them renamed
CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
COCO_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",  # COCO's names
                "sofa": "couch", "tvmonitor": "tv", "aeroplane": "airplane", "motorbike": "motorcycle",
                "pottedplant": "potted plant", "diningtable": "dining table", "hair dryer": "hair drier"}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COLOR_TEMPLATES = ("a photo of a {color} {cls}", "a photo of a {color}-colored {cls}", "a photo of a {color} object")
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
BACKGROUND = (153, 153, 153)  # #999


@dataclass(frozen=True)
class Requirement:
    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None  # (relation, index of the include it is relative to)


@dataclass(frozen=True)
class GenEvalPrompt:
    text: str
    tag: str
    include: tuple[Requirement, ...]
    exclude: tuple[Requirement, ...] = ()
    seed: int = 0
    guidance_scale: float = 7.5


@dataclass
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    mask: torch.Tensor | None = None        # (H, W) bool


def _requirement(item, where: str, earlier: int, *, exclude: bool) -> Requirement:
    if not isinstance(item, dict) or "class" not in item or "count" not in item:
        raise DataError(f"{where}: each include/exclude needs 'class' and 'count'")
    cls, count = item["class"], item["count"]
    if cls not in CLASSES:
        raise DataError(f"{where}: unknown class {cls!r} (GenEval's 80 COCO class names)")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise DataError(f"{where}: count must be a positive integer, got {count!r}")
    color, position = item.get("color"), item.get("position")
    if exclude and (color is not None or position is not None):
        raise DataError(f"{where}: an exclude takes only 'class' and 'count'")
    if color is not None and color not in COLORS:
        raise DataError(f"{where}: unknown color {color!r} (one of {', '.join(COLORS)})")
    if position is not None:
        if (not isinstance(position, (list, tuple)) or len(position) != 2 or position[0] not in RELATIONS
                or not isinstance(position[1], int) or not 0 <= position[1] < earlier):
            raise DataError(f"{where}: position must be [relation, index of an earlier include], relation one of "
                            f"{', '.join(RELATIONS)}; got {position!r}")
        position = (position[0], position[1])
    return Requirement(cls, count, color, position)


def load_metadata(path: str, *, seed: int = 0, guidance_scale: float = 7.5,
                  limit: int | None = None) -> list[GenEvalPrompt]:
    """GenEval's evaluation_metadata.jsonl; prompt i samples with seed + i. DataError (one line) on any bad line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"--geneval: {path!r} is not a file")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"--geneval: {path!r} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"--geneval {path}:{number}"
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise DataError(f"{where}: not a JSON object ({str(error).splitlines()[0][:80]})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise DataError(f"{where}: needs a 'prompt' string")
        if entry.get("tag") not in TAGS:
            raise DataError(f"{where}: tag must be one of {', '.join(TAGS)}, got {entry.get('tag')!r}")
        if not isinstance(entry.get("include"), list) or not entry["include"]:
            raise DataError(f"{where}: needs a non-empty 'include' list")
        include = tuple(_requirement(item, where, index, exclude=False) for index, item in enumerate(entry["include"]))
        exclude = tuple(_requirement(item, where, 0, exclude=True) for item in entry.get("exclude", []))
        prompts.append(GenEvalPrompt(entry["prompt"].strip(), entry["tag"], include, exclude,
                                     seed + len(prompts), guidance_scale))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise DataError(f"--geneval: {path!r} holds no prompts")
    return prompts


def select(detections: dict[str, list[Detection]], tag: str) -> dict[str, list[Detection]]:
    """Per class: instances above the task's threshold, most confident first, at most MAX_OBJECTS."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    kept = {}
    for cls, found in detections.items():
        ranked = sorted((d for d in found if d.score > threshold), key=lambda d: -d.score)[:MAX_OBJECTS]
        if ranked:
            kept[cls] = ranked
    return kept


def relative_position(box_a, box_b) -> set[str]:
    """The relations of box A to box B (x0, y0, x1, y1; y grows downwards)."""
    center_a = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    center_b = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    size = (abs(box_a[2] - box_a[0]) + abs(box_b[2] - box_b[0]), abs(box_a[3] - box_a[1]) + abs(box_b[3] - box_b[1]))
    offset = (center_a[0] - center_b[0], center_a[1] - center_b[1])
    shrunk = [max(abs(o) - POSITION_THRESHOLD * s, 0.0) * (1 if o > 0 else -1 if o < 0 else 0)
              for o, s in zip(offset, size)]
    if all(abs(v) < 1e-3 for v in shrunk):
        return set()
    length = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = shrunk[0] / length, shrunk[1] / length
    return ({"left of"} if dx < -0.5 else set()) | ({"right of"} if dx > 0.5 else set()) | \
        ({"above"} if dy < -0.5 else set()) | ({"below"} if dy > 0.5 else set())


ColourFn = Callable[[list[Detection], str], list[str]]  # (instances of one class, the class) -> their colours


def judge(prompt: GenEvalPrompt, objects: dict[str, list[Detection]], colours: ColourFn) -> tuple[bool, str]:
    """(correct, reasons) of one image's selected detections against its prompt's includes and excludes."""
    correct, reasons, matched = True, [], []
    for req in prompt.include:
        found = objects.get(req.cls, [])[:req.count]
        ok = len(found) >= req.count
        if not ok:
            reasons.append(f"expected {req.cls}>={req.count}, found {len(found)}")
        if ok and req.color is not None:
            named = colours(found, req.cls)
            if named.count(req.color) < req.count:
                ok = False
                reasons.append(f"expected {req.color} {req.cls}>={req.count}, found {named.count(req.color)} "
                               f"{req.color} ({', '.join(named)})")
        if ok and req.position is not None:
            relation, target = req.position
            if matched[target] is None:
                ok = False
                reasons.append(f"no target for {req.cls} to be {relation}")
            else:
                for obj in found:
                    wrong = next((relative_position(obj.box, t.box) for t in matched[target]
                                  if relation not in relative_position(obj.box, t.box)), None)
                    if wrong is not None:
                        ok = False
                        reasons.append(f"expected {req.cls} {relation} target, found "
                                       f"{' and '.join(sorted(wrong)) or 'no relation to the'} target")
                        break
        correct &= ok
        matched.append(found if ok else None)
    for req in prompt.exclude:
        if len(objects.get(req.cls, [])) >= req.count:
            correct = False
            reasons.append(f"expected {req.cls}<{req.count}, found {len(objects[req.cls])}")
    return correct, "; ".join(reasons)


class ColourClassifier:
    """GenEval's colour check: zero-shot CLIP over COLORS on each instance's crop, background painted grey."""

    def __init__(self, model, tokenizer, preprocess, device, templates=COLOR_TEMPLATES, colors=COLORS):
        self.model, self.tokenizer, self.preprocess, self.device = model, tokenizer, preprocess, device
        self.templates, self.colors = templates, tuple(colors)
        self._weights: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def weights(self, cls: str) -> torch.Tensor:
        """(D, len(colors)): per colour, the normalised mean of its templates' normalised text embeddings."""
        if cls not in self._weights:
            columns = []
            for color in self.colors:
                texts = [t.format(color=color, cls=cls) for t in self.templates]
                embeds = self.model.encode_text(self.tokenizer(texts).to(self.device)).float()
                mean = torch.nn.functional.normalize(embeds, dim=-1).mean(dim=0)
                columns.append(mean / mean.norm())
            self._weights[cls] = torch.stack(columns, dim=1)
        return self._weights[cls]

    @staticmethod
    def crop(image, detection: Detection):
        """The PIL crop GenEval classifies: the image inside the mask, grey outside it, cut to the box."""
        from PIL import Image

        if detection.mask is not None:
            mask = Image.fromarray(detection.mask.cpu().numpy().astype("uint8") * 255)
            image = Image.composite(image, Image.new("RGB", image.size, BACKGROUND), mask)
        return image.crop(tuple(int(v) for v in detection.box))

    @torch.no_grad()
    def __call__(self, image, detections: list[Detection], cls: str) -> list[str]:
        crops = torch.stack([self.preprocess(self.crop(image, d)) for d in detections]).to(self.device)
        features = torch.nn.functional.normalize(self.model.encode_image(crops).float(), dim=-1)
        return [self.colors[i] for i in (features @ self.weights(cls)).argmax(dim=1).tolist()]


def load_colour_classifier(clip_model: str, checkpoint: str, device) -> ColourClassifier:
    """The colour CLIP from a local open_clip checkpoint (an architecture name or a model-config JSON)."""
    import open_clip

    from fastgrpo.reward import load_open_clip

    model, tokenizer = load_open_clip(clip_model, checkpoint, device,
                                      settings=("--geneval-clip-model", "--geneval-clip-checkpoint"))
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    preprocess = open_clip.image_transform(size, is_train=False)
    return ColourClassifier(model.eval(), tokenizer, preprocess, device)


class Mask2FormerDetector:
    """transformers' Mask2Former for COCO instance segmentation, from a local directory (model and image-processor
    configs plus weights; safetensors only). Returns, per image, {GenEval class: [Detection]}."""

    def __init__(self, directory: str, device):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        path = Path(directory).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"--geneval-detector: {directory!r} is not a transformers model directory "
                                 "(no config.json)")
        try:
            self.model = Mask2FormerForUniversalSegmentation.from_pretrained(str(path), use_safetensors=True)
            self.processor = Mask2FormerImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"--geneval-detector: cannot load {directory!r}: "
                                 f"{str(error).splitlines()[0][:120]}") from None
        self.model.to(device).eval()
        self.device = device
        names = {i: COCO_ALIASES.get(str(n).lower(), str(n).lower()) for i, n in self.model.config.id2label.items()}
        missing = sorted(set(CLASSES) - set(names.values()))
        if missing:
            raise ModelLoadError(f"--geneval-detector: its labels lack {len(missing)} of GenEval's classes "
                                 f"({', '.join(missing[:4])}...): a COCO instance-segmentation checkpoint is needed")
        self.names = names

    @torch.no_grad()
    def __call__(self, images: list) -> list[dict[str, list[Detection]]]:
        inputs = self.processor(images=images, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        sizes = [(image.height, image.width) for image in images]
        results = self.processor.post_process_instance_segmentation(outputs, threshold=THRESHOLD, target_sizes=sizes,
                                                                    return_binary_maps=True)
        found = []
        for result in results:
            per_class: dict[str, list[Detection]] = {}
            masks = result["segmentation"]
            for index, segment in enumerate(result["segments_info"]):
                mask = masks[index].bool().cpu()
                ys, xs = torch.nonzero(mask, as_tuple=True)
                box = (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)
                per_class.setdefault(self.names[segment["label_id"]], []).append(
                    Detection(box, float(segment["score"]), mask))
            found.append(per_class)
        return found


@dataclass
class GenEvalResults:
    prompts: list[GenEvalPrompt]
    samples_per_prompt: int
    correct: dict[str, torch.Tensor] = field(default_factory=dict)    # model -> (P * N,) bool
    reasons: dict[str, list[str]] = field(default_factory=dict)       # model -> (P * N,) why an image failed
    failures: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # model -> tag -> (k, 3, h, w)


def score_images(images: torch.Tensor, prompts: list[GenEvalPrompt], count: int, detector,
                 colours: ColourClassifier) -> tuple[list[bool], list[str]]:
    """Judge images (K * N, 3, H, W) in [0, 1] of K prompts, N each."""
    from PIL import Image

    pil = [Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()) for img in images]
    detections = detector(pil)
    correct, reasons = [], []
    for index, (image, found) in enumerate(zip(pil, detections)):
        prompt = prompts[index // count]
        ok, why = judge(prompt, select(found, prompt.tag), lambda objs, cls: colours(image, objs, cls))
        correct.append(ok)
        reasons.append(why)
    return correct, reasons


def summarise(results: GenEvalResults, models: list[str], *, resamples: int = 2000, seed: int = 0) -> dict:
    """{tag: {model: estimate}, 'overall': ...}: accuracy per task (mean over its images) and their mean, with 95%
    bootstrap intervals that resample prompts within each task; `change` is trained - base on the same resamples."""
    count = results.samples_per_prompt
    tags = [t for t in TAGS if any(p.tag == t for p in results.prompts)]
    rows = {t: torch.tensor([i for i, p in enumerate(results.prompts) if p.tag == t]) for t in tags}
    gen = torch.Generator().manual_seed(seed)
    draws = {t: torch.randint(len(rows[t]), (resamples, len(rows[t])), generator=gen) for t in tags}
    per_prompt = {m: results.correct[m].double().view(-1, count).mean(dim=1) for m in models}

    def task(model: str, tag: str) -> tuple[float, torch.Tensor]:
        values = per_prompt[model][rows[tag]]
        return float(values.mean()), values[draws[tag]].mean(dim=1)

    def entry(value: float, replicates: torch.Tensor) -> dict:
        low, high = torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        return {"value": round(value, 6), "low": round(low, 6), "high": round(high, 6)}

    summary = {}
    for name in tags + ["overall"]:
        chosen = tags if name == "overall" else [name]
        out = {}
        for model in models:
            parts = [task(model, t) for t in chosen]
            out[model] = entry(sum(v for v, _ in parts) / len(parts), sum(r for _, r in parts) / len(parts))
        if "trained" in models:
            base, trained = ([task(m, t) for t in chosen] for m in ("base", "trained"))
            out["change"] = entry(sum(t[0] - b[0] for b, t in zip(base, trained)) / len(chosen),
                                  sum(t[1] - b[1] for b, t in zip(base, trained)) / len(chosen))
        out["prompts"] = sum(len(rows[t]) for t in chosen)
        summary[name] = out
    return summary


FAILURES_PER_TASK, THUMBNAIL = 4, 128


def run_geneval(models, unets: dict, prompts: list[GenEvalPrompt], settings, detector, colours) -> GenEvalResults:
    """Sample every GenEval prompt with every model from the same noise, in chunks, and judge each image; keeps the
    verdicts and a few failed images per task."""
    from tqdm.auto import tqdm

    from fastgrpo.models import encode_prompts
    from fastgrpo.safety.sampling import sample_images

    count = settings.samples_per_prompt
    results = GenEvalResults(prompts, count)
    per_chunk = max(1, settings.batch_size // count)
    uncond = encode_prompts(models, [""])
    verdicts = {name: [] for name in unets}
    failures = {name: {} for name in unets}
    with tqdm(total=len(prompts), unit="prompt", desc=f"GenEval, {len(prompts)} prompts", leave=False) as bar:
        for start in range(0, len(prompts), per_chunk):
            chunk = prompts[start:start + per_chunk]
            cond = encode_prompts(models, [p.text for p in chunk])
            for name, unet in unets.items():
                images = sample_images(unet, models.vae, models.scheduler, chunk, cond, uncond, settings)
                correct, reasons = score_images(images, chunk, count, detector, colours)
                verdicts[name] += list(zip(correct, reasons))
                for index, ok in enumerate(correct):
                    kept = failures[name].setdefault(chunk[index // count].tag, [])
                    if not ok and len(kept) < FAILURES_PER_TASK:
                        image = images[index:index + 1]
                        if image.shape[-1] > THUMBNAIL:
                            image = torch.nn.functional.interpolate(image, size=(THUMBNAIL, THUMBNAIL), mode="area")
                        kept.append((image[0].cpu(), chunk[index // count].text, reasons[index]))
            bar.update(len(chunk))
    for name in unets:
        results.correct[name] = torch.tensor([ok for ok, _ in verdicts[name]], dtype=torch.bool)
        results.reasons[name] = [why for _, why in verdicts[name]]
        results.failures[name] = failures[name]
    return results


def failure_grid(results: GenEvalResults, models: list[str], path: Path, size: int = THUMBNAIL) -> None:
    """One row per task: up to FAILURES_PER_TASK failed images of each model, each with its prompt and reason."""
    from PIL import Image, ImageDraw

    tags = [t for t in TAGS if any(results.failures[m].get(t) for m in models)]
    columns = FAILURES_PER_TASK * len(models)
    cell = size + 36
    canvas = Image.new("RGB", (120 + columns * size, max(1, len(tags)) * cell + 20), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "failed images per task: " + ", then ".join(models), fill="black")
    for row, tag in enumerate(tags):
        y = 20 + row * cell
        draw.text((4, y + size // 2), tag, fill="black")
        for m_index, model in enumerate(models):
            for k, (image, text, reason) in enumerate(results.failures[model].get(tag, [])):
                x = 120 + (m_index * FAILURES_PER_TASK + k) * size
                pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                canvas.paste(Image.fromarray(pixels).resize((size, size)), (x, y))
                draw.text((x + 2, y + size + 2), text[:24], fill="black")
                draw.text((x + 2, y + size + 16), reason[:24], fill=(180, 30, 30))
    canvas.save(path)


def markdown(summary: dict, models: list[str]) -> list[str]:
    """The report's GenEval section: accuracy per task and overall, with intervals."""
    header = "| task | " + " | ".join(models) + (" | change |" if "trained" in models else " |")
    lines = ["## GenEval", "",
             "Accuracy per task (images whose every include and exclude holds), `overall` the mean of the tasks, as "
             "GenEval scores it; detector: transformers' Mask2Former, so comparable with, not identical to, the "
             "official mmdet numbers. Brackets: 95% bootstrap intervals over prompts.", "",
             header, "| --- " * (len(models) + 1 + ("trained" in models)) + "|"]
    for tag, entry in summary.items():
        cells = [f"{100 * entry[m]['value']:.1f}% [{100 * entry[m]['low']:.1f}, {100 * entry[m]['high']:.1f}]"
                 for m in models + (["change"] if "trained" in models else [])]
        lines.append(f"| {tag} ({entry['prompts']} prompts) | " + " | ".join(cells) + " |")
    return lines + ["", "![GenEval failures](geneval_failures.png)", ""]
