"""GenEval in `fastgrpo eval`: the protocol's decisions against hand-built detections with known answers, the
detector path on a tiny random Mask2Former saved in the transformers format, the colour classifier on rendered
solid-colour objects, the summary against hand arithmetic, and bad metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastgrpo.errors import DataError
from fastgrpo.safety import geneval
from fastgrpo.safety.geneval import (CLASSES, Detection, GenEvalPrompt, GenEvalResults, Requirement, judge,
                                     load_metadata, relative_position, select, summarise)


def box(cx, cy, w=10, h=10, score=0.95):
    return Detection((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), score)


def no_colours(found, cls):
    raise AssertionError("no colour was asked for")


def test_relative_position_by_hand():
    assert relative_position(box(10, 50).box, box(50, 50).box) == {"left of"}
    assert relative_position(box(50, 50).box, box(10, 50).box) == {"right of"}
    assert relative_position(box(50, 10).box, box(50, 50).box) == {"above"}  # y grows downwards
    assert relative_position(box(10, 10).box, box(50, 50).box) == {"left of", "above"}  # the diagonal: both
    # the offset is shrunk by 0.1 x the summed sizes (2 boxes of width 10 -> 2 px) and must keep more than half of
    # its length: 2 px apart is no relation, 4 px exactly half (the boundary: none), 5 px "left of" (3 / 5)
    assert relative_position(box(48, 50).box, box(50, 50).box) == set()
    assert relative_position(box(46, 50).box, box(50, 50).box) == set()
    assert relative_position(box(45, 50).box, box(50, 50).box) == {"left of"}
    # mostly right, a little below: the shrunk y part (1 - 2 = 0) does not count
    assert relative_position(box(80, 51).box, box(50, 50).box) == {"right of"}


def test_select_thresholds_order_and_cap():
    found = {"dog": [box(0, 0, score=s) for s in (0.35, 0.95, 0.5, 0.3, 0.92)]}
    assert [d.score for d in select(found, "two_object")["dog"]] == [0.95, 0.92, 0.5, 0.35]  # > 0.3, by score
    assert [d.score for d in select(found, "counting")["dog"]] == [0.95, 0.92]                # > 0.9 for counting
    assert select({"cat": [box(0, 0, score=0.2)]}, "single_object") == {}
    many = {"cup": [box(i, 0, score=0.5 + i / 100) for i in range(20)]}
    assert len(select(many, "colors")["cup"]) == 16


def prompt(tag, include, exclude=()):
    return GenEvalPrompt("p", tag, tuple(include), tuple(exclude))


def test_counting_off_by_one_and_the_exclude():
    three = prompt("counting", [Requirement("dog", 3)], [Requirement("dog", 4)])
    assert judge(three, {"dog": [box(i * 20, 0) for i in range(3)]}, no_colours) == (True, "")
    ok, why = judge(three, {"dog": [box(i * 20, 0) for i in range(2)]}, no_colours)
    assert not ok and "expected dog>=3, found 2" in why
    ok, why = judge(three, {"dog": [box(i * 20, 0) for i in range(4)]}, no_colours)
    assert not ok and "expected dog<4, found 4" in why


def test_two_objects_need_both():
    two = prompt("two_object", [Requirement("cat", 1), Requirement("couch", 1)])
    assert judge(two, {"cat": [box(0, 0)], "couch": [box(30, 0)]}, no_colours)[0]
    assert not judge(two, {"cat": [box(0, 0)], "dog": [box(30, 0)]}, no_colours)[0]


def test_colour_is_checked_on_the_most_confident_instances():
    red_car = prompt("colors", [Requirement("car", 1, color="red")])
    seen = []

    def colours(found, cls):
        seen.append([d.score for d in found])
        return ["red" if d.score > 0.9 else "blue" for d in found]

    cars = [box(0, 0, score=0.95), box(30, 0, score=0.5)]
    assert judge(red_car, {"car": cars}, colours)[0] and seen == [[0.95]]  # only the top `count` instances
    ok, why = judge(red_car, {"car": cars[::-1][:1]}, colours)
    assert not ok and "expected red car>=1, found 0 red (blue)" in why
    attr = prompt("color_attr", [Requirement("car", 1, color="red"), Requirement("bus", 1, color="blue")])
    assert not judge(attr, {"car": cars[:1], "bus": [box(40, 0, score=0.95)]}, colours)[0]  # the bus is red


def test_position_against_every_instance_of_the_target():
    left = prompt("position", [Requirement("bench", 1), Requirement("dog", 1, position=("left of", 0))])
    assert judge(left, {"bench": [box(60, 50)], "dog": [box(20, 50)]}, no_colours)[0]
    ok, why = judge(left, {"bench": [box(60, 50)], "dog": [box(56, 50)]}, no_colours)  # on the boundary: none
    assert not ok and "expected dog left of target" in why
    ok, why = judge(left, {"dog": [box(20, 50)]}, no_colours)
    assert not ok and "no target for dog to be left of" in why and "expected bench>=1, found 0" in why


def write_lines(path, entries):
    path.write_text("\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries) + "\n", encoding="utf-8")
    return str(path)


def test_metadata_loads_and_seeds_each_prompt(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [
        {"tag": "position", "include": [{"class": "bench", "count": 1},
                                        {"class": "dog", "count": 1, "position": ["left of", 0]}],
         "prompt": "a photo of a dog left of a bench"}, "",
        {"tag": "counting", "include": [{"class": "cup", "count": 2}], "exclude": [{"class": "cup", "count": 3}],
         "prompt": "a photo of two cups"}])
    loaded = load_metadata(path, seed=10)
    assert [p.seed for p in loaded] == [10, 11] and loaded[0].include[1].position == ("left of", 0)
    assert loaded[1].exclude == (Requirement("cup", 3),) and len(load_metadata(path, limit=1)) == 1


@pytest.mark.parametrize("entry, message", [
    ({"tag": "single_object", "prompt": "a photo of a dog"}, "needs a non-empty 'include' list"),
    ({"tag": "single_object", "include": [{"class": "unicorn", "count": 1}], "prompt": "x"}, "unknown class 'unicorn'"),
    ({"tag": "colors", "include": [{"class": "car", "count": 1, "color": "teal"}], "prompt": "x"}, "unknown color"),
    ({"tag": "counting", "include": [{"class": "car", "count": 0}], "prompt": "x"}, "positive integer"),
    ({"tag": "position", "include": [{"class": "car", "count": 1, "position": ["left of", 0]}], "prompt": "x"},
     "earlier include"),
    ({"tag": "shapes", "include": [{"class": "car", "count": 1}], "prompt": "x"}, "tag must be one of"),
    ("{not json", "not a JSON object"),
])
def test_bad_metadata_is_one_line(tmp_path, entry, message):
    path = write_lines(tmp_path / "m.jsonl", [entry])
    with pytest.raises(DataError, match=message) as raised:
        load_metadata(path)
    assert "\n" not in str(raised.value) and "m.jsonl:1" in str(raised.value)


def test_summary_is_the_mean_of_task_accuracies():
    prompts = [prompt("single_object", [Requirement("dog", 1)])] * 2 + [prompt("counting", [Requirement("dog", 2)])]
    results = GenEvalResults(prompts, 2, correct={
        "base": torch.tensor([True, True, True, False, False, False]),
        "trained": torch.tensor([True, True, True, True, True, False])})
    summary = summarise(results, ["base", "trained"], resamples=200)
    assert summary["single_object"]["base"]["value"] == pytest.approx(0.75)
    assert summary["counting"]["trained"]["value"] == pytest.approx(0.5)
    assert summary["overall"]["base"]["value"] == pytest.approx((0.75 + 0.0) / 2)   # tasks weigh alike
    assert summary["overall"]["change"]["value"] == pytest.approx(((1.0 - 0.75) + (0.5 - 0.0)) / 2)
    assert summary["counting"]["prompts"] == 1 and summary["overall"]["prompts"] == 3
    low, high = summary["single_object"]["base"]["low"], summary["single_object"]["base"]["high"]
    assert 0.5 <= low <= 0.75 <= high <= 1.0  # resampling the two prompts (means 1.0 and 0.5)


def tiny_mask2former(directory, favourite: int = 64):
    """A tiny random Mask2Former with COCO's label names, whose class head always prefers `favourite`."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    coco = list(CLASSES)
    coco[64:67] = ["mouse", "remote", "keyboard"]  # COCO's own names for GenEval's renamed classes
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, image_size=64,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=8, id2label=dict(enumerate(coco)),
                               label2id={n: i for i, n in enumerate(coco)})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[favourite] = 20.0
    model.save_pretrained(directory, safe_serialization=True)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(directory)
    return directory


def test_the_detector_loads_from_a_transformers_directory(tmp_path):
    from PIL import Image

    detector = geneval.Mask2FormerDetector(str(tiny_mask2former(tmp_path / "m2f")), torch.device("cpu"))
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 40, 3), dtype=np.uint8))
              for i in range(2)]
    found = detector(images)
    assert len(found) == 2 and set(found[0]) == {"computer mouse"}  # COCO's "mouse" under GenEval's name
    for detection in found[0]["computer mouse"]:
        assert detection.mask.shape == (48, 40) and detection.mask.dtype == torch.bool and detection.score > 0.3
        ys, xs = torch.nonzero(detection.mask, as_tuple=True)
        assert detection.box == (float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1)


def test_a_detector_without_cocos_classes_or_a_directory_is_refused(tmp_path):
    from fastgrpo.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="no config.json"):
        geneval.Mask2FormerDetector(str(tmp_path / "missing"), torch.device("cpu"))
    directory = tiny_mask2former(tmp_path / "m2f")
    config = json.loads((directory / "config.json").read_text())
    config["id2label"] = {str(i): f"thing{i}" for i in range(80)}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="lack 80 of GenEval's classes"):
        geneval.Mask2FormerDetector(str(directory), torch.device("cpu"))


def test_the_colour_classifier_names_rendered_colours():
    """The toy world's CLIP (trained on its renders) with the classifier's zero-shot weights, crops and grey
    background: each rendered object's colour comes out right."""
    from PIL import Image

    from fastgrpo.builtin import clip_files
    from fastgrpo.toyworld import world

    config, weights = clip_files("builtin:toyworld")
    loaded = geneval.load_colour_classifier(str(config), str(weights), torch.device("cpu"))
    colours = world.COLOURS
    classifier = geneval.ColourClassifier(loaded.model, loaded.tokenizer, loaded.preprocess, loaded.device,
                                          templates=("a {color} {cls}",), colors=colours)
    rng, hits, total = np.random.default_rng(0), 0, 0
    for colour in colours:
        for shape in world.SHAPES:
            scene = world.random_scene(rng, colour=colour, shape=shape, size="big", background="white")
            image = Image.fromarray(world.render(scene))
            mask = torch.from_numpy(world.coverage(scene) > 0.5)
            ys, xs = torch.nonzero(mask, as_tuple=True)
            found = Detection((float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1), 1.0, mask)
            hits += classifier(image, [found], shape) == [colour]
            total += 1
    assert hits == total


def test_crops_paint_outside_the_mask_grey():
    from PIL import Image

    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:6] = True
    crop = np.asarray(geneval.ColourClassifier.crop(image, Detection((1, 1, 7, 5), 1.0, mask)))
    assert crop.shape == (4, 6, 3)
    assert (crop[1:3, 1:5] == 200).all() and (crop[0] == 153).all() and (crop[:, 5] == 153).all()


METADATA = [
    {"tag": "single_object", "include": [{"class": "computer mouse", "count": 1}],
     "prompt": "a photo of a computer mouse"},
    {"tag": "counting", "include": [{"class": "computer mouse", "count": 2}],
     "exclude": [{"class": "computer mouse", "count": 3}], "prompt": "a photo of two computer mouses"},
    {"tag": "two_object", "include": [{"class": "computer mouse", "count": 1}, {"class": "dog", "count": 1}],
     "prompt": "a photo of a computer mouse and a dog"},
]


def test_eval_with_geneval_alone_scores_each_task(tiny_pipeline_dir, tiny_clip_files, tmp_path, capsys):
    """`fastgrpo eval --model DIR --unet DIR --geneval ...` without safety prompts: a detector that finds 8 computer
    mice scoring 0.5-0.9 in every image makes the single-object prompt right, the counting prompt wrong (its
    threshold is 0.9) and the two-object prompt wrong (no dog), for both models."""
    from fastgrpo import cli

    config, checkpoint = tiny_clip_files
    detector = tiny_mask2former(tmp_path / "m2f")
    out = tmp_path / "report"
    args = ["eval", "--model", str(tiny_pipeline_dir), "--unet", str(tiny_pipeline_dir),
            "--geneval", write_lines(tmp_path / "meta.jsonl", METADATA), "--geneval-detector", str(detector),
            "--geneval-clip-model", str(config), "--geneval-clip-checkpoint", str(checkpoint),
            "--samples-per-prompt", "2", "--num-steps", "2", "--device", "cpu", "--output", str(out)]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())["geneval"]
    assert [report[t]["base"]["value"] for t in ("single_object", "counting", "two_object")] == [1.0, 0.0, 0.0]
    assert report["overall"]["base"]["value"] == pytest.approx(1 / 3) and report["overall"]["change"]["value"] == 0
    assert "unsafe" not in json.loads((out / "report.json").read_text())
    assert "## GenEval" in (out / "report.md").read_text() and (out / "geneval_failures.png").is_file()
    capsys.readouterr()
    bad = write_lines(tmp_path / "bad.jsonl", [{"tag": "counting", "prompt": "two dogs"}])
    assert cli.main(args[:5] + ["--geneval", bad] + args[7:]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a non-empty 'include' list" in err
    assert cli.main(args[:7] + ["--geneval-detector", str(tmp_path / "nowhere")] + args[9:]) == 2
    assert "--geneval-detector" in capsys.readouterr().err
    assert cli.main(args[:11] + args[13:]) == 2  # no --geneval-clip-checkpoint: refused before any model loads
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--geneval needs --geneval-detector DIR and --geneval-clip-checkpoint" in err
