"""Split assignment of the synthetic benchmark, on scenes small enough to repeat: a scene's split follows its
content (never its seed or its distractors), and the whole generation is the same in every process."""

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from datamodules.synthetic_vqa import Scene, SceneObject, SyntheticVQAConfig, generate_samples, split_of

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")
# 1-2 objects on a 4x4 grid: 1024 one-object scenes, so a few hundred samples repeat scenes within a split (checked
# below) and, were the split not a function of the content, across splits too
SMALL = dict(grid=4, cell_size=8, min_objects=1, max_objects=2, families=("query_at", "exist", "count"))


def test_a_scene_that_repeats_stays_in_one_split():
    config = SyntheticVQAConfig(**SMALL)
    samples = {split: generate_samples(config, split, 400) for split in SPLITS}
    seeds_of = {split: defaultdict(set) for split in SPLITS}
    for split, drawn in samples.items():
        for sample in drawn:
            seeds_of[split][sample.scene.key()].add(sample.scene.seed)
    for split in SPLITS:  # the config really makes scenes collide, drawn from different seeds
        repeated = [key for key, seeds in seeds_of[split].items() if len(seeds) > 1]
        assert len(repeated) >= 10, (split, len(repeated))
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            shared = set(seeds_of[a]) & set(seeds_of[b])
            assert not shared, f"scenes in both {a} and {b}: {sorted(shared)[:3]}"
    for split, drawn in samples.items():
        assert {split_of(s.scene) for s in drawn} == {split}


def test_the_split_depends_on_the_objects_only():
    """Same objects, listed in any order, with other seeds and other distractors: the same split."""
    config = SyntheticVQAConfig(**SMALL)
    for sample in generate_samples(config, "train", 100) + generate_samples(config, "test", 100):
        objects = sample.scene.objects
        expected = split_of(sample.scene)
        for seed in range(12):
            free = [(r, c) for r in range(4) for c in range(4) if all((o.row, o.col) != (r, c) for o in objects)]
            variant = Scene(objects=list(reversed(objects)) if seed % 2 else list(objects),
                            distractors=free[seed % 3: seed % 3 + seed % 5], grid=4, seed=seed * 7919 + 1)
            assert split_of(variant) == expected, (sample.scene.key(), seed)
    # the assignment itself is not constant: all three splits occur over one-object scenes
    splits = {split_of(Scene([SceneObject(c, s, z, r, k)], [], 4, 0))
            for c in ("red", "green", "blue", "cyan") for s in ("square", "circle") for z in ("small", "large")
            for r in range(4) for k in range(4)}
    assert splits == set(SPLITS)


_DIGEST = """
import hashlib, json
from datamodules.synthetic_vqa import SyntheticVQAConfig, generate_samples, render
config = SyntheticVQAConfig(**json.loads({small!r}))
rows = []
for split in ("train", "val", "test"):
    samples = generate_samples(config, split, 20)
    rows += [(s.question_id, s.question, s.answer, s.scene.key()) for s in samples]
    rows.append(hashlib.sha256(render(samples[0].scene).tobytes()).hexdigest())
print(hashlib.sha256(json.dumps(rows).encode()).hexdigest())
"""


def _digest_in_subprocess(hash_seed: str) -> str:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = _DIGEST.format(small=json.dumps(SMALL))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1]


def test_generation_is_the_same_in_every_process():
    """Python's str hash is salted per process (PYTHONHASHSEED): a split or a scene drawn from it would differ
    between the run that trains and the run that evaluates."""
    first, second = _digest_in_subprocess("1"), _digest_in_subprocess("2")
    assert first == second
    rows = []
    config = SyntheticVQAConfig(**SMALL)
    from datamodules.synthetic_vqa import render

    for split in SPLITS:
        samples = generate_samples(config, split, 20)
        rows += [(s.question_id, s.question, s.answer, s.scene.key()) for s in samples]
        rows.append(hashlib.sha256(render(samples[0].scene).tobytes()).hexdigest())
    assert hashlib.sha256(json.dumps(rows).encode()).hexdigest() == first
