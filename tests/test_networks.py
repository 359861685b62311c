"""MED-Net and baselines: sizes, shapes, cross-scale wiring, initialisation, TorchScript export."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ckpt_export
from monai.networks.utils import convert_to_torchscript
from torch.utils.flop_counter import FlopCounterMode

from rcmseg.classes import NUM_CLASSES
from rcmseg.errors import InputError
from rcmseg.networks import (
    DEPTH_ORDERS,
    GATES,
    NETWORK_NAMES,
    PRIORS,
    DynUNet2D,
    MEDNet,
    MEDNetUNet,
    count_parameters,
    get_network,
    side_multiple,
)
from rcmseg.networks.blocks import fold_batch_norms, inference_copy

torch.set_num_threads(2)
# Recent torch deprecates TorchScript; MONAI bundles (models/model.ts) still rely on it.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")

PAPER_PARAMETERS = 6.0e6
BASELINES = ("unet", "fcn", "segnet", "deeplab")
SMALL_WIDTHS = (8, 16, 16, 32, 32)  # same graph as the default widths, faster on CPU


@pytest.fixture(scope="module")
def mednet3() -> MEDNet:
    torch.manual_seed(0)
    return MEDNet(levels=3)


@pytest.fixture(scope="module")
def small_mednet3() -> MEDNet:
    torch.manual_seed(0)
    return MEDNet(levels=3, widths=SMALL_WIDTHS)


@pytest.mark.parametrize("name", ["mednet", "mednet2", "mednet1"])
def test_mednet_has_six_million_parameters(name: str) -> None:
    count = count_parameters(get_network(name))
    assert abs(count - PAPER_PARAMETERS) <= 0.1 * PAPER_PARAMETERS, count


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_are_within_ten_percent_of_mednet(name: str, mednet3: MEDNet) -> None:
    reference = count_parameters(mednet3)
    count = count_parameters(get_network(name))
    assert abs(count - reference) <= 0.1 * reference, (count, reference)


def test_count_parameters_ignores_frozen_ones() -> None:
    layer = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_training_mode_returns_logits_per_level_coarse_to_fine(levels: int) -> None:
    network = MEDNet(levels=levels, widths=SMALL_WIDTHS).train()
    outputs = network(torch.rand(2, 1, 96, 64))  # non-square
    assert isinstance(outputs, list)
    expected = [(2, 6, 96 // 2**m, 64 // 2**m) for m in reversed(range(levels))]
    assert [tuple(output.shape) for output in outputs] == expected


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_eval_mode_returns_finest_logits(levels: int) -> None:
    network = MEDNet(levels=levels, in_channels=2, out_channels=4, widths=SMALL_WIDTHS).eval()
    with torch.no_grad():
        logits = network(torch.rand(1, 2, 64, 96))
    assert isinstance(logits, torch.Tensor)
    assert logits.shape == (1, 4, 64, 96)


def test_inputs_must_be_multiples_of_32(small_mednet3: MEDNet) -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        small_mednet3.eval()(torch.rand(1, 1, 48, 64))


def test_bad_levels_and_widths_are_refused() -> None:
    with pytest.raises(ValueError, match="levels"):
        MEDNet(levels=4)
    with pytest.raises(ValueError, match="widths"):
        MEDNet(widths=(8, 16, 32))


def test_levels_see_pooled_image_label_prior_and_shared_features(small_mednet3: MEDNet) -> None:
    """Hooks read the tensors that flow between levels and check the paper's wiring."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, what: str):
        def hook(_module, inputs, output):
            seen[name] = (inputs[0] if what == "input" else output).detach().clone()

        return hook

    coarse, middle, fine = small_mednet3.levels
    handles = [
        coarse.encoders[0].register_forward_hook(keep("coarse_in", "input")),
        middle.encoders[-1].register_forward_hook(keep("middle_bottleneck", "output")),
        middle.head.register_forward_hook(keep("middle_logits", "output")),
        fine.encoders[0].register_forward_hook(keep("fine_in", "input")),
        fine.encoders[-2].register_forward_hook(keep("fine_before_gate", "output")),
        fine.encoders[-1].register_forward_hook(keep("fine_gated", "input")),
    ]
    image = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        small_mednet3.eval()(image)
    for handle in handles:
        handle.remove()

    # Coarsest level: the image average-pooled 4x, alone.
    torch.testing.assert_close(seen["coarse_in"], F.avg_pool2d(image, 4))
    # Finest level: image + the middle level's softmax upsampled 2x (label prior).
    prior = F.interpolate(seen["middle_logits"].softmax(1), scale_factor=2.0, mode="bilinear")
    assert seen["fine_in"].shape[1] == 1 + 6
    torch.testing.assert_close(seen["fine_in"], torch.cat([image, prior], dim=1))
    # Feature sharing: fine features at H/16 times the middle bottleneck (H/32) upsampled 2x.
    assert seen["fine_before_gate"].shape[-2:] == (4, 6)
    gate = F.interpolate(seen["middle_bottleneck"], scale_factor=2.0, mode="bilinear")
    torch.testing.assert_close(seen["fine_gated"], seen["fine_before_gate"] * gate)


def test_widths_are_shared_by_levels_without_shared_weights(mednet3: MEDNet) -> None:
    coarse, middle, fine = mednet3.levels
    assert [len(level.encoders) for level in mednet3.levels] == [3, 4, 5]
    for k in range(3):
        widths = {level.encoders[k].conv1.conv.out_channels for level in mednet3.levels}
        assert len(widths) == 1
    assert coarse.encoders[1].conv1.conv.weight is not fine.encoders[1].conv1.conv.weight


def test_convolutions_are_he_normal(mednet3: MEDNet) -> None:
    weight = mednet3.levels[-1].encoders[3].conv2.conv.weight  # 3x3, many fan-in
    fan_in = weight.shape[1] * weight.shape[2] * weight.shape[3]
    expected_std = math.sqrt(2.0 / (1 + 0.01**2) / fan_in)
    assert abs(weight.std().item() - expected_std) < 0.05 * expected_std
    assert abs(weight.mean().item()) < 0.05 * expected_std


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_return_one_logits_tensor_in_both_modes(name: str) -> None:
    network = get_network(name)
    image = torch.rand(1, 1, 96, 64)
    assert network.train()(image).shape == (1, 6, 96, 64)
    with torch.no_grad():
        assert network.eval()(image).shape == (1, 6, 96, 64)


@pytest.mark.parametrize("levels", [2, 3])
def test_mednet_is_the_measured_paper_reading_and_legacy_keeps_the_old_one(levels: int) -> None:
    suffix = "" if levels == 3 else str(levels)
    paper = get_network(f"mednet{suffix}")
    assert (paper.depth_order, paper.gate_mode, paper.detach_prior) == (
        "deeper_coarse",
        "sigmoid",
        True,
    )
    blocks = [len(level.encoders) for level in paper.levels]  # coarse to fine
    assert blocks == sorted(blocks, reverse=True)  # coarser levels are the deeper ones
    legacy = get_network(f"mednet{suffix}_legacy")
    assert (legacy.depth_order, legacy.gate_mode, legacy.detach_prior) == (
        "shallower_coarse",
        "product",
        False,
    )


def test_get_network_knows_its_names_and_passes_options() -> None:
    assert set(NETWORK_NAMES) == {
        "mednet",
        "mednet2",
        "mednet1",
        "mednet_unet",
        "dynunet",
        "mednet_deep",
        "mednet_deep_noprior",
        "mednet_unet_in",
        "mednet_dynunet",
        "mednet_legacy",
        "mednet2_legacy",
        "dynunet_ds",
        "dynunet_tiny",
        *BASELINES,
    }
    small = get_network("MEDNet2", in_channels=3, out_channels=2, widths=(4, 8, 8, 8, 8))
    assert isinstance(small, MEDNet) and small.num_levels == 2
    assert small.levels[-1].encoders[0].conv1.conv.in_channels == 3 + 2
    with pytest.raises(InputError, match="unknown network 'resnet'; choose one of mednet"):
        get_network("resnet")


def test_torchscript_round_trip_gives_identical_outputs(small_mednet3: MEDNet, tmp_path) -> None:
    path = tmp_path / "mednet.ts"
    torch.jit.save(torch.jit.script(small_mednet3.eval()), str(path))
    loaded = torch.jit.load(str(path))
    image = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        expected = small_mednet3(image)
        for _ in range(3):  # past the profiling executor's warm-up runs
            assert torch.equal(loaded(image), expected)
    loaded.train()
    outputs = loaded(torch.rand(2, 1, 64, 64))
    assert [tuple(o.shape[-2:]) for o in outputs] == [(16, 16), (32, 32), (64, 64)]


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_script_too(name: str) -> None:
    network = get_network(name).eval()
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(network)(image), network(image))


def test_monai_convert_to_torchscript_verifies(tmp_path) -> None:
    # convert_to_torchscript switches the network to eval mode itself.
    network = MEDNet(levels=2, widths=SMALL_WIDTHS).train()
    convert_to_torchscript(
        network,
        str(tmp_path / "model.ts"),
        verify=True,
        inputs=[torch.rand(1, 1, 64, 64)],
        device=torch.device("cpu"),
    )
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    assert loaded(torch.rand(1, 1, 64, 64)).shape == (1, 6, 64, 64)


def test_monai_bundle_ckpt_export_of_a_trained_checkpoint(tmp_path) -> None:
    """What ``python -m monai.bundle ckpt_export`` does with a bundle defining MED-Net."""
    config = tmp_path / "inference.json"
    config.write_text(json.dumps({"network_def": {"_target_": "rcmseg.networks.MEDNet"}}))
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"version": "0.0.1"}))
    torch.manual_seed(1)
    trained = MEDNet()
    torch.save(trained.state_dict(), tmp_path / "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=str(tmp_path / "model.ts"),
        ckpt_file=str(tmp_path / "model.pt"),
        meta_file=str(meta),
        config_file=str(config),
    )
    exported = torch.jit.load(str(tmp_path / "model.ts"))
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported(image), trained.eval()(image))


@pytest.mark.parametrize("levels", [1, 3])
def test_folded_batch_norms_give_the_same_logits_and_leave_the_network_alone(levels: int) -> None:
    from rcmseg.networks.blocks import fold_batch_norms

    torch.manual_seed(0)
    network = MEDNet(levels=levels, widths=(8, 16, 16, 32, 32))
    network.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            network(torch.rand(2, 1, 64, 64))
    network.eval()
    before = {k: v.clone() for k, v in network.state_dict().items()}
    x = torch.rand(2, 1, 96, 64)
    folded = fold_batch_norms(network)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), network(x), rtol=1e-4, atol=1e-4)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert fold_batch_norms(network.train()) is network  # training mode: nothing to fold


# --- issue 11: gate, depth order, prior, U-Net-like levels, DynUNet ------------------------------

DEMO_WEIGHTS = (
    Path(__file__).resolve().parents[1] / "bundles" / "rcm_mednet" / "models" / "model.pt"
)


def test_demo_bundle_weights_load_into_the_bundles_dynunet() -> None:
    if not DEMO_WEIGHTS.is_file():
        pytest.skip("no demo weights in this checkout")
    state = torch.load(DEMO_WEIGHTS, map_location="cpu", weights_only=True)
    network = get_network("dynunet_ds")
    network.load_state_dict(state)  # strict: the shipped weights are the default network's
    assert any(key.startswith("net.deep_supervision_heads.") for key in state)
    with torch.no_grad():
        logits = network.eval()(torch.rand(1, 1, 64, 64))
    assert torch.isfinite(logits).all()


def test_tiny_dynunet_is_the_default_a_quarter_as_wide_at_a_fifteenth_of_the_arithmetic() -> None:
    tiny, default = get_network("dynunet_tiny"), get_network("dynunet_ds")
    assert tiny.net.filters == [8, 16, 32, 64, 128]  # the default's 32-64-128-256-336
    assert count_parameters(tiny) < count_parameters(default) / 10
    window = torch.rand(1, 1, 256, 256)
    flops = []
    for network in (tiny.eval(), default.eval()):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(window)
        flops.append(counter.get_total_flops())
    assert flops[0] < flops[1] / 12  # 1.5 against 23.1 GFLOP per 256² window
    tiny.train()
    assert isinstance(tiny(window), list)  # deep supervision, like the default


@pytest.mark.parametrize(
    "name",
    [
        "mednet_unet",
        "dynunet",
        "mednet_deep",
        "mednet_deep_noprior",
        "mednet_unet_in",
        "mednet_dynunet",
    ],
)
def test_new_networks_have_six_million_parameters(name: str) -> None:
    count = count_parameters(get_network(name))
    assert abs(count - PAPER_PARAMETERS) <= 0.1 * PAPER_PARAMETERS, count


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_unet_level_mednets_are_six_million_at_every_depth(levels: int) -> None:
    count = count_parameters(MEDNetUNet(levels=levels))
    assert abs(count - PAPER_PARAMETERS) <= 0.1 * PAPER_PARAMETERS, count


@pytest.mark.parametrize("depth_order", DEPTH_ORDERS)
def test_depth_orders_keep_about_six_million_parameters(depth_order: str) -> None:
    count = count_parameters(MEDNet(levels=3, depth_order=depth_order))
    assert abs(count - PAPER_PARAMETERS) <= 0.1 * PAPER_PARAMETERS, count


def _forward_backward(network: torch.nn.Module, side: int) -> list[torch.Tensor]:
    network.train()
    outputs = network(torch.rand(2, 1, side, side))
    outputs = outputs if isinstance(outputs, list) else [outputs]
    sum(o.square().mean() for o in outputs).backward()
    grads = [p.grad for p in network.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    return outputs


@pytest.mark.parametrize("level", ["fcn", "unet", "dynunet"])
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("depth_order", DEPTH_ORDERS)
@pytest.mark.parametrize("gate", GATES)
def test_every_option_runs_forward_and_backward_with_the_right_shapes(
    gate: str, depth_order: str, prior: str, level: str
) -> None:
    torch.manual_seed(0)
    network = MEDNet(
        levels=3, widths=SMALL_WIDTHS, gate=gate, depth_order=depth_order, prior=prior, level=level
    )
    side = network.side_multiple
    assert side == (128 if depth_order == "deeper_coarse" else 32)
    outputs = _forward_backward(network, side)
    assert [tuple(o.shape) for o in outputs] == [
        (2, 6, side // 2**m, side // 2**m) for m in (2, 1, 0)
    ]
    with torch.no_grad():
        assert network.eval()(torch.rand(1, 1, side, 2 * side)).shape == (1, 6, side, 2 * side)


def test_depth_orders_give_the_papers_two_readings() -> None:
    shallow = MEDNet(levels=3, widths=SMALL_WIDTHS)
    deep = MEDNet(levels=3, widths=SMALL_WIDTHS, depth_order="deeper_coarse")
    assert [len(level.encoders) for level in shallow.levels] == [3, 4, 5]  # coarse to fine
    assert [len(level.encoders) for level in deep.levels] == [5, 4, 3]
    with pytest.raises(ValueError, match="multiples of 128"):
        deep.eval()(torch.rand(1, 1, 64, 64))


@pytest.mark.parametrize("gate", ["sigmoid", "residual", "none"])
def test_gates_do_what_they_say(gate: str) -> None:
    seen: dict[str, torch.Tensor] = {}
    network = MEDNet(levels=2, widths=SMALL_WIDTHS, gate=gate).eval()
    coarse, fine = network.levels

    def keep(name: str, index: int):
        def hook(_module, inputs, output):
            seen[name] = (inputs[0] if index == 0 else output).detach().clone()

        return hook

    handles = [
        coarse.encoders[-1].register_forward_hook(keep("bottleneck", 1)),
        fine.encoders[-2].register_forward_hook(keep("before", 1)),
        fine.encoders[-1].register_forward_hook(keep("gated", 0)),
    ]
    with torch.no_grad():
        network(torch.rand(1, 1, 64, 64))
    for handle in handles:
        handle.remove()
    g = F.interpolate(seen["bottleneck"], scale_factor=2.0, mode="bilinear")
    expected = {
        "sigmoid": seen["before"] * torch.sigmoid(g),
        "residual": seen["before"] * (1 + torch.sigmoid(g)),
        "none": seen["before"],
    }[gate]
    torch.testing.assert_close(seen["gated"], expected)


def test_prior_options_change_the_finer_input() -> None:
    assert (
        MEDNet(levels=2, widths=SMALL_WIDTHS, prior="none")
        .levels[-1]
        .encoders[0]
        .conv1.conv.in_channels
        == 1
    )
    assert (
        MEDNet(levels=2, widths=SMALL_WIDTHS, prior="logits")
        .levels[-1]
        .encoders[0]
        .conv1.conv.in_channels
        == 1 + 6
    )
    with pytest.raises(ValueError, match="prior"):
        MEDNet(prior="probabilities")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gate"):
        MEDNet(gate="tanh")  # type: ignore[arg-type]


def test_detached_prior_blocks_the_finer_gradient_into_the_coarse_level() -> None:
    torch.manual_seed(0)
    for detach in (False, True):
        network = MEDNet(levels=2, widths=SMALL_WIDTHS, gate="none", detach_prior=detach).train()
        coarse_out, fine_out = network(torch.rand(2, 1, 64, 64))
        fine_out.square().mean().backward()  # the finer level's loss only
        grad = network.levels[0].head.weight.grad
        assert (grad is None or not grad.abs().sum()) == detach


def test_dynunet_shapes_and_optional_deep_supervision() -> None:
    network = get_network("dynunet", filters=(8, 16, 16, 32, 32))
    image = torch.rand(2, 1, 64, 96)
    assert network.train()(image).shape == (2, 6, 64, 96)
    with torch.no_grad():
        assert network.eval()(image).shape == (2, 6, 64, 96)
    supervised = get_network("dynunet", filters=(8, 16, 16, 32, 32), deep_supervision=True)
    outputs = _forward_backward(supervised, 64)
    assert len(outputs) == 3 and all(o.shape == (2, 6, 64, 64) for o in outputs)
    three_heads = get_network(
        "dynunet", filters=(8, 16, 16, 32, 32), deep_supervision=True, deep_supr_num=3
    )
    outputs = _forward_backward(three_heads, 64)
    assert len(outputs) == 4 and all(o.shape == (2, 6, 64, 64) for o in outputs)


def test_deeply_supervised_dynunet_can_be_copied_for_inference_after_training_steps() -> None:
    # MONAI keeps the auxiliary heads' outputs on the module; a trainer's validation copies the
    # network (inference_copy) after training steps, which used to fail on those graph tensors
    network = get_network("dynunet", filters=(8, 16, 16, 32, 32), deep_supervision=True)
    _forward_backward(network, 64)
    copied = inference_copy(network)
    with torch.no_grad():
        assert copied(torch.rand(1, 1, 64, 64)).shape == (1, 6, 64, 64)
    assert len(_forward_backward(network, 64)) == 3  # the heads still train


def test_deeply_supervised_dynunet_scripts_without_its_training_heads() -> None:
    # MONAI's deeply supervised DynUNet cannot be scripted; ckpt_export scripts the bundle's
    network = get_network("dynunet_ds", filters=(8, 16, 16, 32, 32))
    _forward_backward(network, 64)
    scripted = torch.jit.script(network.eval())
    image = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), network(image))
    assert not any("deep_supervision" in key for key in scripted.state_dict())
    assert network.deep_supervision  # the network itself keeps its heads


def test_dynunet_with_a_stride_2_first_stage_runs_at_half_resolution() -> None:
    network = get_network("dynunet", filters=(8, 16, 16, 32, 32), strides=(2, 2, 2, 2, 2))
    full = get_network("dynunet", filters=(8, 16, 16, 32, 32))
    assert count_parameters(network) == count_parameters(full)  # same layers, other strides
    image = torch.rand(1, 1, 64, 96)
    seen: list[tuple[int, ...]] = []
    head = network.net.output_block.conv.conv
    handle = head.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.no_grad():
        logits = network.eval()(image)
    handle.remove()
    assert seen == [(1, 6, 32, 48)] and logits.shape == (1, 6, 64, 96)  # upsampled to the input
    supervised = get_network(
        "dynunet", filters=(8, 16, 16, 32, 32), strides=(2, 2, 2, 2, 2), deep_supervision=True
    )
    assert all(o.shape == (2, 6, 64, 64) for o in _forward_backward(supervised, 64))


def test_blurred_stride_stops_a_fine_pattern_aliasing_into_a_coarse_one() -> None:
    """A ±1 checkerboard (the finest pattern a grid holds) through a stride-2 sampler: plain, it
    aliases to a constant +1; blurred first (BlurredStride), it is gone (0 inside, where reflect
    padding plays no part)."""
    from rcmseg.networks.blocks import BlurredStride

    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checkerboard = (1 - 2 * ((rows + cols) % 2)).float()[None, None]
    sampler = torch.nn.Conv2d(1, 1, 1, stride=2, bias=False)
    torch.nn.init.ones_(sampler.weight)
    with torch.no_grad():
        aliased = sampler(checkerboard)
        blurred = BlurredStride(sampler)(checkerboard)
    assert torch.equal(aliased, torch.ones(1, 1, 8, 8))
    assert blurred[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_anti_aliased_dynunet_blurs_every_downsampling_and_keeps_its_contract() -> None:
    """`anti_alias=True`: the same parameters, a blur before each of the four strided
    convolutions (none before transposed ones), and it scripts and copies for inference with
    equal outputs, its training heads dropped as usual."""
    from rcmseg.networks.blocks import BlurredStride

    torch.manual_seed(0)
    network = get_network(
        "dynunet", filters=(8, 16, 16, 32, 32), deep_supervision=True, anti_alias=True
    )
    plain = get_network("dynunet", filters=(8, 16, 16, 32, 32), deep_supervision=True)
    assert count_parameters(network) == count_parameters(plain)
    assert sum(isinstance(m, BlurredStride) for m in network.modules()) == 4
    _forward_backward(network, 64)
    image = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        expected = network.eval()(image)
        torch.testing.assert_close(torch.jit.script(network)(image), expected)
        # the copy runs its instance norms as group norms, channels-last: float32 reassociation
        torch.testing.assert_close(inference_copy(network)(image), expected, atol=1e-4, rtol=1e-4)


def test_residual_dynunet_adds_its_shortcuts_and_keeps_its_contract() -> None:
    """`res_block=True`: every encoder stage a residual block (MONAI keeps the decoder plain, as
    nnU-Net's residual encoders do), a 1×1 projection where width or stride changes (so a few
    more parameters), and it trains with its heads, scripts without them and
    copies for inference (group norms) with equal outputs; the image-reading projection is an
    edge convolution kept float32 under autocast like the first 3×3 one."""
    from monai.networks.blocks.dynunet_block import UnetResBlock

    from rcmseg.networks.blocks import Float32Output, edge_layers_in_float32

    torch.manual_seed(0)
    filters = (8, 16, 16, 32, 32)
    network = get_network("dynunet", filters=filters, deep_supervision=True, res_block=True)
    plain = get_network("dynunet", filters=filters, deep_supervision=True)
    residual_blocks = [m for m in network.modules() if isinstance(m, UnetResBlock)]
    assert len(residual_blocks) == len(filters)
    assert count_parameters(plain) < count_parameters(network) < 1.1 * count_parameters(plain)
    assert all(o.shape == (2, 6, 64, 64) for o in _forward_backward(network, 64))
    image = torch.rand(1, 1, 64, 96)
    with torch.no_grad():
        expected = network.eval()(image)
        torch.testing.assert_close(torch.jit.script(network)(image), expected)
        # the copy runs its instance norms as group norms, channels-last: float32 reassociation
        torch.testing.assert_close(inference_copy(network)(image), expected, atol=1e-4, rtol=1e-4)
    wrapped = edge_layers_in_float32(inference_copy(network))
    first = wrapped.net.input_block
    assert isinstance(first.conv1.conv, Float32Output)
    assert isinstance(first.conv3.conv, Float32Output)


def test_dynunet_stages_follow_its_filters() -> None:
    # one stride per stage by default: six filters give six stages, five downsamplings
    network = get_network("dynunet", filters=(8, 8, 16, 16, 32, 32)).eval()
    assert list(network.net.strides) == [1, 2, 2, 2, 2, 2]
    with torch.no_grad():
        assert network(torch.rand(1, 1, 64, 96)).shape == (1, 6, 64, 96)
    with pytest.raises(ValueError, match="one entry per stage"):
        DynUNet2D(filters=(8, 16, 32), strides=(1, 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"level": "unet"},
        {"level": "dynunet"},
        {"gate": "residual", "depth_order": "deeper_coarse"},
    ],
)
def test_new_mednets_script_and_fold(kwargs: dict) -> None:
    torch.manual_seed(0)
    network = MEDNet(levels=3, widths=SMALL_WIDTHS, **kwargs).train()
    side = network.side_multiple
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            network(torch.rand(2, 1, side, side))
    network.eval()
    x = torch.rand(1, 1, side, side)
    with torch.no_grad():
        expected = network(x)
        torch.testing.assert_close(fold_batch_norms(network)(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(torch.jit.script(network)(x), expected)


def test_dynunet_survives_fold_batch_norms() -> None:
    network = get_network("dynunet", filters=(8, 16, 16, 32, 32)).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fold_batch_norms(network)(x), network(x))


def test_batch_norm_tiny_dynunet_folds_every_norm_away_with_equal_logits() -> None:
    torch.manual_seed(0)
    network = get_network("dynunet_tiny", norm="batch")
    assert count_parameters(network) == count_parameters(get_network("dynunet_tiny"))
    network.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            network(torch.rand(4, 1, 64, 64))
    network.eval()
    folded = inference_copy(network)
    norms = (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.InstanceNorm2d)
    assert not any(isinstance(m, norms) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in network.modules())  # left alone
    x = torch.rand(2, 1, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), network(x), rtol=1e-4, atol=1e-4)
    scripted = torch.jit.script(network)  # what ckpt_export writes: no training heads
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network(x))


def test_dynunet_refuses_an_unknown_norm() -> None:
    with pytest.raises(InputError, match="network 'dynunet': norm must be"):
        get_network("dynunet", norm="layer")


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("dynunet_ds", {"filters": [8, 16]}, "filters needs at least 4 stages for 2 deep-super"),
        ("dynunet_ds", {"filters": [8, 16, 32]}, "filters needs at least 4 stages"),
        ("dynunet", {"filters": [8]}, "filters needs at least 3 stages, got 1"),
        ("dynunet_ds", {"bogus": 3}, r"dynunet\(\) got an unexpected keyword argument 'bogus'"),
        ("mednet", {"levels": 4}, "MED-Net has 1, 2 or 3 levels, got 4"),
    ],
)
def test_settings_a_network_refuses_are_one_input_error(name, kwargs, message) -> None:
    with pytest.raises(InputError, match=f"^network '{name}': {message}"):
        get_network(name, **kwargs)


@pytest.mark.parametrize("name", ["dynunet", "mednet_unet_in", "mednet_dynunet"])
def test_inference_copy_turns_instance_norms_into_group_norms_with_equal_logits(name: str) -> None:
    from rcmseg.networks.blocks import inference_copy

    torch.manual_seed(0)
    kwargs = {"filters": (8, 16, 16, 32, 32)} if name == "dynunet" else {"widths": SMALL_WIDTHS}
    network = get_network(name, **kwargs).train()
    with torch.no_grad():  # affine weights away from (1, 0)
        for norm in network.modules():
            if isinstance(norm, torch.nn.InstanceNorm2d):
                norm.weight.uniform_(0.5, 1.5)
                norm.bias.uniform_(-0.5, 0.5)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    copied = inference_copy(network)
    assert network.training  # the caller's network keeps its mode and its modules
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in network.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm2d) for m in copied.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in copied.modules())
    assert not copied.training
    images = torch.rand(3, 1, 64, 64)
    images[1] *= 0.2
    network.eval()
    with torch.no_grad():
        expected = network(images)
        torch.testing.assert_close(copied(images), expected, rtol=1e-4, atol=1e-4)
        cl = copy.deepcopy(copied).to(memory_format=torch.channels_last)
        got = cl(images.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, before[key])
    assert set(copied.state_dict()) == set(before)  # same names: weights load either way


def test_instance_norms_with_running_statistics_stay() -> None:
    from rcmseg.networks.blocks import instance_norms_as_group_norms

    tracked = torch.nn.Sequential(torch.nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    assert isinstance(instance_norms_as_group_norms(tracked)[0], torch.nn.InstanceNorm2d)


@pytest.mark.parametrize("level", ["fcn", "unet", "dynunet"])
def test_instance_norm_normalises_each_image_alone_and_survives_fold(level: str) -> None:
    torch.manual_seed(0)
    network = MEDNet(levels=3, widths=SMALL_WIDTHS, prior="none", norm="instance", level=level)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    assert norms and all(isinstance(m, torch.nn.InstanceNorm2d) and m.affine for m in norms)
    images = torch.rand(3, 1, 64, 64)
    images[1] *= 0.2  # a darker scan in the same batch
    with torch.no_grad():
        together = network.train()(images)[-1]
        alone = network(images[1:2])[-1]
        # even in training mode an image's logits do not depend on the rest of the batch
        torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-4)
        network.eval()
        torch.testing.assert_close(fold_batch_norms(network)(images), network(images))
        torch.testing.assert_close(torch.jit.script(network)(images), network(images))
    with pytest.raises(ValueError, match="norm"):
        MEDNet(norm="group")  # type: ignore[arg-type]


def test_dynunet_level_mednet_nests_dynunets() -> None:
    # one level of it is the bundle's DynUNet: the same stages and the same parameter count
    single = MEDNet(levels=1, level="dynunet", prior="none", norm="instance")
    assert count_parameters(single) == count_parameters(get_network("dynunet"))
    nested = get_network("mednet_dynunet")
    assert isinstance(nested, MEDNet) and nested.level_kind == "dynunet"
    # coarse to fine: 3, 4, 5 stages, each first stage at its level's own input size
    assert [len(level.encoders) for level in nested.levels] == [3, 4, 5]
    strides = [level.encoders[0].conv1.conv.stride for level in nested.levels]
    assert strides == [(1, 1)] * 3
    nested.train()
    with torch.no_grad():
        outputs = nested(torch.rand(1, 1, 128, 128))
    assert [tuple(o.shape) for o in outputs] == [(1, 6, 32, 32), (1, 6, 64, 64), (1, 6, 128, 128)]


@pytest.mark.parametrize("name", ["dynunet", "mednet", "mednet_dynunet", "unet", "deeplab"])
def test_edge_layers_read_the_image_and_write_the_logits_in_float32(name: str) -> None:
    """Under bf16 autocast the wrapped layers see the float32 image and write float32 logits;
    without autocast the wrapping changes nothing."""
    from rcmseg.networks.blocks import Float32Output, edge_layers_in_float32, inference_copy

    torch.manual_seed(0)
    kwargs = {"filters": (8, 16, 16, 32, 32)} if name == "dynunet" else {}
    if name.startswith("mednet"):
        kwargs = {"widths": SMALL_WIDTHS}
    network = inference_copy(get_network(name, **kwargs))
    wrapped = edge_layers_in_float32(copy.deepcopy(network))
    edges = [m.layer for m in wrapped.modules() if isinstance(m, Float32Output)]
    readers = [conv for conv in edges if conv.in_channels in (1, 1 + NUM_CLASSES)]
    assert readers and any(conv.out_channels == NUM_CLASSES for conv in edges)
    seen: list[torch.Tensor] = []
    for conv in readers:
        conv.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    side = side_multiple(network)
    images = torch.rand(2, 1, side, side)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(images), network(images), rtol=0, atol=0)
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = wrapped(images)
    assert logits.dtype == torch.float32
    # the finest reader sees the image itself (MED-Net's: next to the coarser level's prior)
    assert any(x.shape[-2:] == images.shape[-2:] and torch.equal(x[:, :1], images) for x in seen)
