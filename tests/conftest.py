import os

import pytest
import torch

# Tiny models gain nothing from more threads, and oversubscribed OpenMP threads (subprocess tests, a shared
# machine) spin-wait: one thread unless OMP_NUM_THREADS says otherwise.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


TINY_VOCAB = 64
TINY_IMAGE_TOKEN = 63


@pytest.fixture
def tiny_spec():
    from lvlm_prune.modeling import TinyLlavaSpec

    # 4 layers, GQA, 16 visual tokens: every engine path, in milliseconds.
    return TinyLlavaSpec(
        image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=2, vision_heads=2,
        hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        max_position_embeddings=128, vision_feature_layer=-2,
    )


def make_tiny_llava(spec, attn_implementation="sdpa", seed=0):
    from lvlm_prune.modeling import build_tiny_llava

    model = build_tiny_llava(
        spec, vocab_size=TINY_VOCAB, image_token_id=TINY_IMAGE_TOKEN,
        attn_implementation=attn_implementation, seed=seed,
    )
    return model.eval()


@pytest.fixture
def tiny_llava(tiny_spec):
    """A random tiny LLaVA (SDPA attention), eval mode."""
    return make_tiny_llava(tiny_spec)


def make_batch(spec, batch_size=2, text_len=6, left_pad=(0, 2), seed=0):
    """input_ids = [pad*p, bos, image*N, text...] left-padded; returns ids, mask, pixels."""
    g = torch.Generator().manual_seed(seed)
    n_img = spec.num_visual_tokens
    rows, masks = [], []
    length = 1 + n_img + text_len
    for b in range(batch_size):
        pad = left_pad[b % len(left_pad)]
        text = torch.randint(3, TINY_VOCAB - 1, (text_len - pad,), generator=g)
        row = torch.cat([torch.zeros(pad, dtype=torch.long), torch.tensor([1]),
                         torch.full((n_img,), TINY_IMAGE_TOKEN), text])
        rows.append(row)
        masks.append(torch.cat([torch.zeros(pad), torch.ones(length - pad)]).long())
    pixels = torch.randn(batch_size, 3, spec.image_size, spec.image_size, generator=g)
    return torch.stack(rows), torch.stack(masks), pixels


def save_tiny_base(directory, seed: int = 0, default_grid: bool = False):
    """Saves a random tiny LLaVA + processor on the synthetic benchmark's vocabulary to `directory`: what
    `base_model_path` / `processor_path` point at in module tests. A grid of 4 x 8 px cells (16 visual tokens) by
    default; `default_grid`: the data's default 8 x 8 grid (64 visual tokens), which scripts and benchmarks build
    without grid options."""
    from datamodules.synthetic_vqa import SyntheticVQAConfig, vocabulary
    from lvlm_prune.modeling import TinyLlavaSpec, build_tiny_llava
    from lvlm_prune.modeling.tokenizer import build_processor, build_word_tokenizer

    config = SyntheticVQAConfig() if default_grid else SyntheticVQAConfig(grid=4, cell_size=8, min_objects=4,
                                                                          max_objects=5)
    image_size = config.grid * config.cell_size
    tokenizer = build_word_tokenizer(vocabulary(config))
    spec = TinyLlavaSpec(image_size=image_size, patch_size=config.cell_size, vision_hidden_size=32, vision_layers=2,
                         vision_heads=2, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                         num_kv_heads=2, max_position_embeddings=256)
    model = build_tiny_llava(spec, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=seed)
    model.save_pretrained(directory)
    build_processor(tokenizer, image_size=image_size, patch_size=config.cell_size).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"), seed=0)


@pytest.fixture
def stand_in_trainer(monkeypatch):
    """Runs a LightningModule's hooks outside a Trainer: `module.trainer` becomes a namespace with the given fields
    and a strategy whose boolean reduction is one process's decision; logging is dropped."""
    from types import SimpleNamespace

    def attach(module, strategy=None, **fields):
        strategy = SimpleNamespace() if strategy is None else strategy
        monkeypatch.setattr(strategy, "reduce_boolean_decision", lambda decision, all=True: decision, raising=False)
        trainer = SimpleNamespace(strategy=strategy, **fields)
        monkeypatch.setattr(type(module), "trainer", property(lambda self: trainer))
        monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
        monkeypatch.setattr(module, "log_dict", lambda *args, **kwargs: None)
        return trainer

    return attach


TINY_DATA_ARGS = dict(grid=4, cell_size=8, min_objects=4, max_objects=5, num_train=32, num_val=16, num_test=16, batch_size=8,
                      eval_batch_size=8)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process (world size 1), destroyed after the test: the code paths of DDP runs
    (rank files, gathers, barriers) without a second process."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
