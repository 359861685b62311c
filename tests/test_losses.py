"""MDSC + γ·TV, plain Dice, cross-entropy and their compound on partially labelled maps, with deep
supervision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rcmseg.classes import UNLABELLED
from rcmseg.losses import (
    LabelledDiceLoss,
    downsample_label_tensor,
    make_loss,
    total_variation,
)

torch.set_num_threads(2)
U = UNLABELLED


def _random_case(seed: int = 0, batch: int = 2, size: int = 16, classes=(0, 1, 2, 3, 4, 5)):
    """Random logits and labels with a block of unlabelled pixels in every image."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 6, size, size, generator=generator)
    choice = torch.randint(0, len(classes), (batch, 1, size, size), generator=generator)
    labels = torch.tensor(classes)[choice]
    labels[:, :, : size // 4] = U
    labels[:, :, :, -3:] = U
    return logits, labels


def _mdsc_as_written(probabilities, labels, epsilon=1e-5):
    """The spec's MDSC over the labelled pixels of the whole batch, every term kept."""
    labelled = labels[:, 0] != U
    total = torch.zeros(())
    for k in range(probabilities.shape[1]):
        p = probabilities[:, k][labelled]
        g = (labels[:, 0][labelled] == k).float()
        total = total + 1 - 2 * (p * g).sum() / ((p * p).sum() + (g * g).sum() + epsilon)
        q, h = 1 - p, 1 - g
        total = total + 1 - 2 * (q * h).sum() / ((q * q).sum() + (h * h).sum() + epsilon)
    return total


def test_mdsc_of_a_hand_example() -> None:
    """Two classes, pixels a (P=0.8/0.2, class 0), b (0.4/0.6, class 1), c unlabelled.

    TP0 = 1 - 1.6/1.8, TP1 = 1 - 1.2/1.4, TN0 = 1 - 1.2/1.4, TN1 = 1 - 1.6/1.8.
    """
    probabilities = torch.tensor([[0.8, 0.4, 0.1], [0.2, 0.6, 0.9]]).reshape(1, 2, 1, 3)
    labels = torch.tensor([0, 1, U]).reshape(1, 1, 1, 3)
    loss = LabelledDiceLoss(num_classes=2, gamma=0.0, epsilon=0.0)
    value = loss(probabilities.log(), labels)
    expected = 2 * (1 - 1.6 / 1.8) + 2 * (1 - 1.2 / 1.4)
    assert value.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("batch", [True, False])
def test_perfect_prediction_scores_zero_even_with_absent_classes(batch: bool) -> None:
    # Only classes 0 and 2 occur: the TP terms of 1, 3, 4, 5 have no ground truth and are skipped.
    _, labels = _random_case(classes=(0, 2))
    perfect = 50.0 * F.one_hot(torch.where(labels == U, 4, labels)[:, 0], 6).permute(0, 3, 1, 2)
    loss = make_loss("mdsc_tv", gamma=0.0, batch=batch)
    assert loss(perfect.float(), labels).item() == pytest.approx(0.0, abs=1e-4)
    # The formula alone would give 1 per absent class.
    as_written = _mdsc_as_written(perfect.float().softmax(1), labels).item()
    assert as_written == pytest.approx(4.0, abs=1e-4)


def test_skipping_absent_classes_removes_constants_not_gradients() -> None:
    logits, labels = _random_case(classes=(1, 3, 5))
    logits.requires_grad_(True)
    value = make_loss("mdsc_tv", gamma=0.0)(logits, labels)
    (ours,) = torch.autograd.grad(value, logits)
    as_written = _mdsc_as_written(logits.softmax(1), labels)
    (theirs,) = torch.autograd.grad(as_written, logits)
    assert value.item() == pytest.approx(as_written.item() - 3.0, rel=1e-5)  # 3 absent classes
    torch.testing.assert_close(ours, theirs)


def test_all_unlabelled_patch_gives_zero_dice_and_no_gradient() -> None:
    logits = torch.randn(1, 6, 8, 8, requires_grad=True)
    labels = torch.full((1, 1, 8, 8), U)
    loss = make_loss("mdsc_tv", gamma=0.0)
    value = loss(logits, labels)
    value.backward()
    assert value.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


@pytest.mark.parametrize("name", ["mdsc_tv", "dice", "ce", "mdsc_tv_ce"])
@pytest.mark.parametrize("batch", [True, False])
def test_unlabelled_pixels_get_exactly_zero_gradient(name: str, batch: bool) -> None:
    logits, labels = _random_case(seed=3)
    logits.requires_grad_(True)
    make_loss(name, gamma=0.0, batch=batch)(logits, labels).backward()
    unlabelled = (labels == U).expand_as(logits)
    assert torch.all(logits.grad[unlabelled] == 0)
    assert torch.count_nonzero(logits.grad[~unlabelled]) > 0.9 * (~unlabelled).sum()


def test_deep_supervision_gradients_are_zero_where_coarse_labels_are_unlabelled() -> None:
    logits, labels = _random_case(seed=4, size=32)
    outputs = [
        F.avg_pool2d(logits, 4).requires_grad_(True),
        F.avg_pool2d(logits, 2).requires_grad_(True),
        logits.requires_grad_(True),
    ]
    make_loss("mdsc_tv", gamma=0.0)(outputs, labels).backward()
    for output in outputs:
        coarse = downsample_label_tensor(labels, tuple(output.shape[-2:]))
        assert torch.all(output.grad[(coarse == U).expand_as(output)] == 0)
        assert torch.count_nonzero(output.grad) > 0


def test_tv_of_constant_map_is_zero_and_of_a_step_is_its_height() -> None:
    assert total_variation(torch.full((2, 6, 8, 8), 1 / 6)).item() == 0.0
    # Left half class 0, right half class 1 (4 rows): each row jumps by 1 in both channels.
    step = torch.zeros(1, 2, 4, 6)
    step[0, 0, :, :3] = 1.0
    step[0, 1, :, 3:] = 1.0
    assert total_variation(step).item() == 4 * 2 * 1.0
    # A 0.3 -> 0.7 ramp down the rows of one channel: 3 steps of 0.4 in each of 5 columns.
    ramp = torch.tensor([0.3, 0.3, 0.7, 0.7]).reshape(1, 1, 4, 1).expand(1, 1, 4, 5)
    assert total_variation(ramp).item() == pytest.approx(5 * 0.4)


def test_loss_adds_gamma_times_tv_over_all_pixels_and_exposes_terms() -> None:
    logits, labels = _random_case(seed=5)
    gamma = 1e-3
    loss = make_loss("mdsc_tv", gamma=gamma)
    value = loss(logits, labels)
    tv = total_variation(logits.softmax(1))  # unlabelled pixels included
    dice = make_loss("mdsc_tv", gamma=0.0)(logits, labels)
    assert loss.last_tv.item() == pytest.approx(gamma * tv.item(), rel=1e-5)
    assert loss.last_dice.item() == pytest.approx(dice.item(), rel=1e-6)
    assert value.item() == pytest.approx(dice.item() + gamma * tv.item(), rel=1e-6)


def test_default_gamma_is_the_papers_for_mdsc_and_zero_for_ablations() -> None:
    assert make_loss("mdsc_tv").loss.gamma == 1e-6
    assert make_loss("dice").loss.gamma == 0.0
    assert make_loss("ce").loss.gamma == 0.0
    assert make_loss("ce", gamma=1e-6).loss.gamma == 1e-6


def test_plain_dice_has_only_true_positive_terms() -> None:
    probabilities = torch.tensor([[0.8, 0.4], [0.2, 0.6]]).reshape(1, 2, 1, 2)
    labels = torch.tensor([0, 1]).reshape(1, 1, 1, 2)
    loss = LabelledDiceLoss(num_classes=2, true_negatives=False, gamma=0.0, epsilon=0.0)
    value = loss(probabilities.log(), labels)
    assert value.item() == pytest.approx((1 - 1.6 / 1.8) + (1 - 1.2 / 1.4), rel=1e-6)


def test_batch_and_per_image_sums_differ_only_when_images_differ() -> None:
    logits, labels = _random_case(seed=6, batch=1)
    twice = (logits.repeat(2, 1, 1, 1), labels.repeat(2, 1, 1, 1))
    per_batch = make_loss("mdsc_tv", gamma=0.0, batch=True)(*twice)
    per_image = make_loss("mdsc_tv", gamma=0.0, batch=False)(*twice)
    assert per_batch.item() == pytest.approx(per_image.item(), rel=1e-5)
    other_logits, other_labels = _random_case(seed=7, batch=1, classes=(0, 1))
    mixed = (torch.cat([logits, other_logits]), torch.cat([labels, other_labels]))
    per_batch = make_loss("mdsc_tv", gamma=0.0, batch=True)(*mixed)
    per_image = make_loss("mdsc_tv", gamma=0.0, batch=False)(*mixed)
    assert per_batch.item() != pytest.approx(per_image.item(), rel=1e-3)


def test_cross_entropy_ignores_unlabelled_pixels() -> None:
    logits, labels = _random_case(seed=8)
    labelled = labels[:, 0] != U
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[labelled], labels[:, 0][labelled].long())
    assert make_loss("ce")(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert make_loss("ce")(logits, torch.full_like(labels, U)).item() == 0.0


def test_compound_loss_is_mdsc_tv_plus_k_times_cross_entropy_at_every_level() -> None:
    logits, labels = _random_case(seed=9, size=32)
    outputs = [F.avg_pool2d(logits, 2), logits]
    gamma = 1e-3
    compound = make_loss("mdsc_tv_ce", gamma=gamma)
    mdsc_tv, ce = make_loss("mdsc_tv", gamma=gamma), make_loss("ce")
    expected = mdsc_tv(outputs, labels) + 6 * ce(outputs, labels)
    assert compound(outputs, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert compound.last_tv.item() == pytest.approx(mdsc_tv.last_tv.item(), rel=1e-6)
    data_term = mdsc_tv.last_dice + 6 * ce.last_dice
    assert compound.last_dice.item() == pytest.approx(data_term.item(), rel=1e-6)
    assert make_loss("mdsc_tv_ce").loss.gamma == 1e-6


def test_label_downsampling_votes_honestly() -> None:
    labels = torch.tensor(
        [
            [2, 2, U, U, 1, 3, 0, 0],
            [2, U, U, 1, 3, 1, U, U],
        ]
    ).reshape(1, 1, 2, 8)
    coarse = downsample_label_tensor(labels, (1, 4))
    # [2,2,2,U] -> 2; [U,U,U,1] -> U; [1,3,3,1] tie -> 1 (lower index); [0,0,U,U] half -> 0.
    assert coarse.flatten().tolist() == [2, U, 1, 0]
    assert coarse.dtype == torch.int64
    with pytest.raises(ValueError, match="cannot downsample"):
        downsample_label_tensor(labels, (1, 3))


def test_deep_supervision_sums_levels_on_downsampled_labels() -> None:
    logits, labels = _random_case(seed=9, size=32)
    coarse = torch.randn(2, 6, 8, 8)
    middle = torch.randn(2, 6, 16, 16)
    loss = make_loss("mdsc_tv", gamma=1e-4)
    total = loss([coarse, middle, logits], labels)
    single = make_loss("mdsc_tv", gamma=1e-4)
    parts, dice, tv = 0.0, 0.0, 0.0
    for output in (coarse, middle, logits):
        parts += single(output, downsample_label_tensor(labels, tuple(output.shape[-2:]))).item()
        dice += single.last_dice.item()
        tv += single.last_tv.item()
    assert total.item() == pytest.approx(parts, rel=1e-5)
    assert loss.last_dice.item() == pytest.approx(dice, rel=1e-5)
    assert loss.last_tv.item() == pytest.approx(tv, rel=1e-5)


def test_bad_names_and_label_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("focal")
    logits = torch.randn(1, 6, 4, 4)
    with pytest.raises(ValueError, match="labels must be"):
        make_loss("mdsc_tv")(logits, torch.full((1, 1, 4, 4), 7))


def test_network_training_step_runs_end_to_end() -> None:
    from rcmseg.networks import MEDNet

    torch.manual_seed(0)
    network = MEDNet(levels=3, widths=(4, 8, 8, 8, 8)).train()
    _, labels = _random_case(seed=10, size=64)
    loss = make_loss("mdsc_tv")
    value = loss(network(torch.rand(2, 1, 64, 64)), labels)
    value.backward()
    assert torch.isfinite(value)
    assert 0.0 < loss.last_tv.item() < loss.last_dice.item()
    assert all(p.grad is not None for p in network.parameters())


def test_loss_runs_in_float32_on_low_precision_outputs() -> None:
    """Under autocast (CUDA AMP, or bfloat16 on CPU as here) the Dice sums stay in float32."""
    from rcmseg.networks import MEDNet

    network = MEDNet(levels=2, widths=(4, 8, 8, 8, 8)).train()
    _, labels = _random_case(seed=11, size=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = network(torch.rand(2, 1, 64, 64))
    assert outputs[-1].dtype == torch.bfloat16
    value = make_loss("mdsc_tv")(outputs, labels)
    value.backward()
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_level_weights_weight_each_output_and_are_checked() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (2, 1, 16, 16))
    outputs = [torch.randn(2, 6, 4, 4), torch.randn(2, 6, 8, 8), torch.randn(2, 6, 16, 16)]
    equal = make_loss("mdsc_tv")
    total = equal(outputs, labels)
    per_level = [float(v) for v in equal.last_level_dice]
    assert len(per_level) == 3
    weighted = make_loss("mdsc_tv", gamma=0.0, level_weights=(0.25, 0.5, 1.0))
    value = weighted(outputs, labels)
    torch.testing.assert_close(
        value, torch.tensor(0.25 * per_level[0] + 0.5 * per_level[1] + per_level[2])
    )
    # the logged data term stays the unweighted sum over levels
    torch.testing.assert_close(weighted.last_dice, torch.tensor(sum(per_level)))
    assert float(total) >= float(value)
    finest = make_loss("mdsc_tv", level_weights=(0.0, 0.0, 1.0))
    torch.testing.assert_close(finest(outputs, labels), make_loss("mdsc_tv")(outputs[-1], labels))
    # a single tensor is never weighted
    torch.testing.assert_close(
        finest(outputs[-1], labels), make_loss("mdsc_tv")(outputs[-1], labels)
    )
    with pytest.raises(ValueError, match="2 level weights for 3 outputs"):
        make_loss(level_weights=(1.0, 1.0))(outputs, labels)
    with pytest.raises(ValueError, match="non-negative"):
        make_loss(level_weights=(1.0, -1.0))


@pytest.mark.parametrize("name", ["mdsc_tv", "dice", "ce", "mdsc_tv_ce"])
def test_one_hot_soft_targets_give_the_same_loss_as_integer_labels(name: str) -> None:
    logits, labels = _random_case(seed=3)
    labelled = labels != U
    soft = F.one_hot(torch.where(labelled, labels, 0)[:, 0], 6).permute(0, 3, 1, 2).float()
    soft = soft * labelled  # no target where the expert labelled nothing
    loss = make_loss(name, gamma=1e-3)
    assert torch.allclose(loss(logits, soft), loss(logits, labels), atol=1e-5)


def test_soft_targets_are_averaged_down_and_fitting_them_scores_lower() -> None:
    targets = torch.softmax(torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(0)), 1)
    coarse = downsample_label_tensor(targets, (4, 4))
    assert torch.allclose(coarse, F.avg_pool2d(targets, 2))
    assert torch.allclose(coarse.sum(1), torch.ones(2, 4, 4))
    loss = make_loss("dice", gamma=0.0)
    fitted = loss(torch.log(targets), targets)  # softmax(log p) = p
    assert fitted < loss(torch.zeros(2, 6, 8, 8), targets)
    with pytest.raises(ValueError, match="soft targets need 6 channels"):
        loss(torch.zeros(2, 6, 8, 8), targets[:, :5])
