import math
import pickle

import pytest
import torch

from lvlm_prune.rcp import (
    RCPSchedule,
    gumbel_noise_enabled,
    gumbel_temperature,
    sparsity_target_keep,
    training_progress,
    warmup_cosine_lr_lambda,
)


def test_temperature_anneals_exponentially_then_holds():
    assert gumbel_temperature(0.0) == pytest.approx(1.5)
    assert gumbel_temperature(0.6) == pytest.approx(0.2)
    assert gumbel_temperature(0.9) == pytest.approx(0.2)
    assert gumbel_temperature(0.3) == pytest.approx(math.sqrt(1.5 * 0.2))  # geometric midpoint
    values = [gumbel_temperature(p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="anneal_fraction"):
        gumbel_temperature(0.1, anneal_fraction=0.0)
    with pytest.raises(ValueError, match="progress"):
        gumbel_temperature(-0.1)


def test_noise_is_on_until_eighty_percent():
    assert gumbel_noise_enabled(0.0)
    assert gumbel_noise_enabled(0.799)
    assert not gumbel_noise_enabled(0.8)
    assert not gumbel_noise_enabled(1.0)


def test_sparsity_target_cosine_from_keep_all_to_target():
    target = 1 - 0.778
    assert sparsity_target_keep(0.0, target) == pytest.approx(1.0)
    assert sparsity_target_keep(0.05, target) == pytest.approx((1 + target) / 2)
    # a quarter of the way: cosine, not a straight line (which would give 1 - (1 - target) / 4)
    quarter = target + (1 - target) * (1 + math.cos(math.pi / 4)) / 2
    assert sparsity_target_keep(0.025, target) == pytest.approx(quarter)
    assert sparsity_target_keep(0.1, target) == pytest.approx(target)
    assert sparsity_target_keep(1.0, target) == pytest.approx(target)
    with pytest.raises(ValueError, match="target_keep_fraction"):
        sparsity_target_keep(0.5, 1.2)


def test_rcp_schedule_bundles_the_schedules():
    schedule = RCPSchedule(target_keep_fraction=0.25)
    start, end = schedule(0.0), schedule(training_progress(1000, 1000))
    assert (start.temperature, start.noise, start.target_keep_fraction) == pytest.approx((1.5, True, 1.0))
    assert (end.temperature, end.noise, end.target_keep_fraction) == pytest.approx((0.2, False, 0.25))
    assert schedule(0.37) == schedule(0.37)
    # each schedule reads its own fraction: temperature 0.6, noise 0.8, keep target 0.1
    assert schedule(0.3).temperature == pytest.approx(math.sqrt(1.5 * 0.2))
    assert schedule(0.7).noise and not schedule(0.8).noise
    assert schedule(0.05).target_keep_fraction == pytest.approx(0.625)
    with pytest.raises(ValueError, match="noise_off_fraction"):
        RCPSchedule(target_keep_fraction=0.25, noise_off_fraction=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        training_progress(3, 0)


def test_warmup_cosine_lr_with_lambda_lr_and_resume():
    total = 50
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=5e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lr_lambda(total))
    rates = []
    for _ in range(total + 3):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(5e-5 / 5)
    assert rates[4] == pytest.approx(5e-5)  # warm-up: 10 % of 50 steps
    assert max(rates) == pytest.approx(5e-5)
    assert rates[total] == pytest.approx(5e-6)
    assert rates[-1] == pytest.approx(5e-6)
    assert all(a >= b - 1e-12 for a, b in zip(rates[4:], rates[5:]))

    lr_lambda = warmup_cosine_lr_lambda(total)
    assert pickle.loads(pickle.dumps(lr_lambda))(17) == lr_lambda(17)
    assert warmup_cosine_lr_lambda(1, warmup_fraction=0.1)(0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="warmup_fraction"):
        warmup_cosine_lr_lambda(total, warmup_fraction=1.0)
    with pytest.raises(ValueError, match="final_ratio"):
        warmup_cosine_lr_lambda(total, final_ratio=-0.1)


def test_the_plugin_module_trains_with_this_schedule_and_names_a_bad_fraction(tiny_base_dir):
    from lightning_modules.compensation import CompensationModule
    from lvlm_prune.modeling.loading import load_processor
    from lvlm_prune.rcp.compensation import RCPCompensation

    def module(**kwargs):
        return CompensationModule(str(tiny_base_dir), RCPCompensation(target_prune_ratio=0.5, pruning_layers=[1]),
                                  load_processor(str(tiny_base_dir)), **kwargs)

    trained = module(warmup_fraction=0.05, final_lr_ratio=0.2)
    trained.trainer = type("T", (), {"estimated_stepping_batches": 30})()
    scheduler = trained.configure_optimizers()["lr_scheduler"]["scheduler"]
    expected = warmup_cosine_lr_lambda(30, 0.05, 0.2)
    assert scheduler.lr_lambdas[0].warmup_steps == expected.warmup_steps == 2  # ceil(1.5): at least the fraction
    factors = [scheduler.lr_lambdas[0](step) for step in range(31)]
    assert factors == [expected(step) for step in range(31)]
    assert factors[30] == pytest.approx(0.2) and max(factors) == pytest.approx(1.0)  # decays to final_lr_ratio
    with pytest.raises(ValueError, match="model.warmup_fraction=1.0"):
        module(warmup_fraction=1.0)


@pytest.mark.parametrize("plugin_class", ["rcp", "accm"])
def test_exported_config_is_the_constructor_arguments_and_rebuilds_the_plugin(plugin_class):
    import inspect

    from lvlm_prune.accm.compensation import ACCMCompensation
    from lvlm_prune.rcp.compensation import RCPCompensation

    cls = {"rcp": RCPCompensation, "accm": ACCMCompensation}[plugin_class]
    plugin = cls(target_prune_ratio=0.75)
    config = plugin.export_config()
    assert set(config) == set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert config["target_prune_ratio"] == 0.75
    assert cls(**config).export_config() == config
