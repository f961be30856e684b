"""The drift core (kernel/drift.py): binning, PSI, JS, binned KS and the window accumulator.

Known values are worked out by hand in the comments; no process is started.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelfleet.kernel.drift import (
    PSI_EPSILON,
    DriftWindow,
    FeatureRef,
    Reference,
    TensorBinner,
    TensorRef,
    build_tensor_ref,
    js_distance,
    ks_binned,
    parse_reference,
    psi,
    quantile_edges,
    score,
)
from modelfleet.kernel.errors import BundleError


def numeric(name: str, edges: tuple[float, ...], counts: tuple[int, ...]) -> FeatureRef:
    return FeatureRef(name, "numeric", counts, edges=edges)


def test_bins_are_closed_on_the_left_with_open_outer_bins_and_a_missing_slot() -> None:
    # edges 0, 1, 2: bins (-inf,0) [0,1) [1,2) [2,inf), then missing.
    ref = TensorRef("x", "input", "columns", 1, (numeric("x[0]", (0.0, 1.0, 2.0), (0,) * 5),))
    binner = TensorBinner(ref)
    values = np.array([[-5.0], [0.0], [0.5], [1.0], [1.999], [2.0], [np.inf], [-np.inf], [np.nan]])
    assert binner.count(values)[0].tolist() == [2, 2, 2, 2, 1]


def test_numeric_and_categorical_features_in_one_tensor_and_wide_edge_lists() -> None:
    feats = (
        numeric("a", (0.0,), (0, 0, 0)),
        FeatureRef("b", "categorical", (0,) * 4, categories=(3, 1)),
        numeric("c", tuple(float(i) for i in range(40)), (0,) * 42),  # searchsorted path
    )
    binner = TensorBinner(TensorRef("x", "input", "columns", 3, feats))
    assert not binner.broadcast  # 40 edges: the per-feature searchsorted path
    rows = np.array([[-1.0, 3.0, -0.5], [2.0, 1.0, 39.5], [np.nan, 7.0, 10.0], [1.0, 2.5, np.nan]])
    a, b, c = binner.count(rows)
    assert a.tolist() == [1, 2, 1]
    # categories 3, 1: then other (7 and the non-integer 2.5), then missing
    assert b.tolist() == [1, 1, 2, 0]
    assert c[0] == 1 and c[40] == 1 and c[11] == 1 and c[41] == 1


def test_string_categories_count_unknown_values_as_other() -> None:
    data = np.array(["de", "fr", "de", "de", "it"] * 200, dtype=object)
    t = build_tensor_ref("country", "input", data, width=1, top_k=2)
    (f,) = t.features
    assert f.name == "country" and f.kind == "categorical"
    assert f.categories == ("de", "fr") and f.counts == (600, 200, 200, 0)
    binner = TensorBinner(t)
    live = np.array(["fr", "xx", None], dtype=object)
    assert binner.count(binner.features(live))[0].tolist() == [0, 1, 1, 1]


def test_quantile_edges_deduplicate_ties_and_a_constant_feature_keeps_one_edge() -> None:
    assert quantile_edges(np.arange(100, dtype=np.float64), 4) == (24.75, 49.5, 74.25)
    assert quantile_edges(np.full(50, 3.0), 10) == (3.0,)
    mostly_zero = np.concatenate([np.zeros(80), np.arange(1, 21, dtype=np.float64)])
    edges = quantile_edges(mostly_zero, 10)
    assert edges[0] == 0.0 and list(edges) == sorted(set(edges))
    assert quantile_edges(np.array([np.nan, np.inf]), 10) == ()


def test_integer_codes_stored_as_floats_become_categories() -> None:
    codes = np.tile(np.arange(5, dtype=np.float32), 200)
    (f,) = build_tensor_ref("x", "input", codes.reshape(-1, 1), width=1).features
    assert f.kind == "categorical" and sorted(f.categories) == [0, 1, 2, 3, 4]
    (g,) = build_tensor_ref("x", "input", (codes + 0.5).reshape(-1, 1), width=1).features
    assert g.kind == "numeric"


def test_psi_known_values() -> None:
    assert psi([10, 10], [10, 10]) == 0.0
    # proportions (0.5, 0.5) vs (0.25, 0.75), smoothing aside: 2 * ... = 0.25*ln2 + 0.25*ln(1.5)/..
    want = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert psi([50, 50], [25, 75]) == pytest.approx(want, rel=1e-3)
    # An empty reference bin holding a tenth of the live rows: about 0.1 * ln(0.1 / eps).
    got = psi([100, 0], [90, 10])
    assert got == pytest.approx(0.1 * math.log(0.1 / PSI_EPSILON), rel=0.05)
    assert math.isfinite(got)
    # Scale free: counts, not proportions.
    assert psi([1, 3], [10, 30]) == pytest.approx(0.0, abs=1e-12)


def test_js_distance_known_values() -> None:
    assert js_distance([5, 5], [5, 5]) == 0.0
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: the maximum
    # p = (1, 0), q = (0.5, 0.5): m = (0.75, 0.25); KL(p||m) = log2(4/3), KL(q||m) =
    # 0.5*log2(2/3) + 0.5*log2(2); JSD = average of the two.
    jsd = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5) / 2
    assert js_distance([4, 0], [2, 2]) == pytest.approx(math.sqrt(jsd))


def test_ks_binned_known_values() -> None:
    assert ks_binned([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0
    # CDFs (0.25, 0.5, 0.75, 1) vs (0, 0, 0.5, 1): largest gap 0.5.
    assert ks_binned([1, 1, 1, 1], [0, 0, 1, 1]) == pytest.approx(0.5)
    assert ks_binned([1, 0], [0, 1]) == pytest.approx(1.0)


def test_score_leaves_missing_out_of_ks_and_has_no_ks_for_categories() -> None:
    f = numeric("a", (0.0,), (50, 50, 0))
    s = score("x", f, [0, 50, 50], 100)
    assert s.ks == pytest.approx(0.5)  # half missing: KS over the ordered bins only
    assert s.psi > 1 and s.flagged() and s.rows == 100 and s.counts == (0, 50, 50)
    c = FeatureRef("b", "categorical", (5, 5, 0, 0), categories=("u", "v"))
    assert score("x", c, [5, 5, 0, 0], 10).ks is None
    with pytest.raises(ValueError, match="no live rows"):
        score("x", f, [0, 0, 0], 100)


def test_window_matches_one_shot_binning_and_resets() -> None:
    rng = np.random.default_rng(3)
    ref_rows = rng.standard_normal((2000, 5)).astype(np.float32)
    t = build_tensor_ref("x", "input", ref_rows, width=5)
    reference = Reference(2000, (t,))
    window = DriftWindow(reference, buffer_rows=64)
    live = rng.standard_normal((1000, 5)).astype(np.float32)
    # Batches of 1, 16 and one larger than the buffer: all paths of add().
    sizes = [1] * 50 + [16] * 20 + [100] * 3 + [330]
    assert sum(sizes) == 1000
    pos = 0
    for n in sizes:
        window.add({"x": live[pos : pos + n], "other": live[:1]})
        pos += n
    snap = window.snapshot()
    assert snap.rows == {"x": 1000} and snap.offered == len(sizes)
    want = TensorBinner(t).count_flat(live)
    assert snap.counts["x"].tolist() == want.tolist()
    scores = snap.scores(reference)
    assert [s.feature for s in scores] == [f"x[{i}]" for i in range(5)]
    assert all(s.psi < 0.05 for s in scores)
    empty = window.snapshot()
    assert empty.rows == {"x": 0} and empty.scores(reference) == []


def test_a_shift_of_half_a_standard_deviation_is_flagged_and_no_shift_is_not() -> None:
    rng = np.random.default_rng(11)
    t = build_tensor_ref("x", "input", rng.standard_normal((20000, 4)), width=4)
    reference = Reference(20000, (t,))
    window = DriftWindow(reference)
    live = rng.standard_normal((30000, 4))
    live[:, 2] += 0.5
    window.add({"x": live})
    flagged = [s.feature for s in window.snapshot().scores(reference) if s.flagged()]
    assert flagged == ["x[2]"]


def test_wide_tensors_are_summarised_by_mean_std_and_a_seeded_projection() -> None:
    rng = np.random.default_rng(5)
    images = rng.random((600, 3, 10, 10)).astype(np.float32)  # 300 values per row
    t = build_tensor_ref("img", "input", images, width=300, projection_seed=9)
    assert t.reduction == "summary" and t.projection_dims == 8
    assert [f.name for f in t.features][:3] == ["img:mean", "img:std", "img:proj[0]"]
    again = build_tensor_ref("img", "input", images, width=300, projection_seed=9)
    assert again == t  # the seed makes the projection, and so the reference, reproducible
    reference = parse_reference(Reference(600, (t,)).to_json())
    window = DriftWindow(reference)
    window.add({"img": images[:100]})
    assert all(s.psi < 0.5 for s in window.snapshot().scores(reference))
    window.add({"img": images[:100] * 0.5})  # darker images: the mean moves
    by_name = {s.feature: s for s in window.snapshot().scores(reference)}
    assert by_name["img:mean"].flagged()


def _valid_json() -> dict:
    t = build_tensor_ref("x", "input", np.random.default_rng(0).standard_normal((600, 2)), width=2)
    return Reference(600, (t,)).to_json()


def test_parse_reference_round_trips() -> None:
    data = _valid_json()
    assert parse_reference(data).to_json() == data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["tensors"][0]["features"][1]["edges"].reverse(), "strictly increasing"),
        (
            lambda d: d["tensors"][0]["features"][0]["edges"].__setitem__(3, float("nan")),
            r"edge 3 is nan; edges must be finite",
        ),
        (
            lambda d: d["tensors"][0]["features"][0]["edges"].__setitem__(
                4, d["tensors"][0]["features"][0]["edges"][3]
            ),
            "strictly increasing",
        ),
        (lambda d: d["tensors"][0]["features"][0]["counts"].pop(), "has 10 counts"),
        (lambda d: d["tensors"][0]["features"][0]["counts"].__setitem__(0, -1), "integers >= 0"),
        (lambda d: d.__setitem__("rows", 601), "add up to 600"),
        (lambda d: d.__setitem__("format", 2), "unsupported format 2"),
        (lambda d: d["tensors"][0].__setitem__("width", 3), "width is 3"),
        (lambda d: d["tensors"][0].__setitem__("role", "label"), "role must be"),
    ],
)
def test_parse_reference_refuses_what_it_cannot_trust(change, message) -> None:
    data = _valid_json()
    change(data)
    with pytest.raises(BundleError, match=message) as info:
        parse_reference(data)
    assert str(info.value).startswith("reference.json: ")


def test_float32_rows_bin_exactly_as_float64_at_the_edges() -> None:
    # Edges are float64 quantiles; float32 rows are compared with edges rounded up to float32,
    # which must not move a value that sits on or next to an edge into another bin.
    data = np.random.default_rng(4).standard_normal((1000, 3)).astype(np.float32)
    binner = TensorBinner(build_tensor_ref("x", "input", data, width=3))
    edges = np.array(binner.ref.features[0].edges)
    near = edges.astype(np.float32)
    values = np.concatenate(
        [near, np.nextafter(near, np.float32(-np.inf)), np.nextafter(near, np.float32(np.inf))]
    )
    rows = np.tile(values[:, None], (1, 3))
    assert binner.count_flat(rows).tolist() == binner.count_flat(rows.astype(np.float64)).tolist()


def test_integer_categories_count_the_same_vectorised_and_value_by_value() -> None:
    rng = np.random.default_rng(8)
    data = np.column_stack(
        [rng.integers(0, 6, 700), rng.standard_normal(700), rng.integers(-2, 2, 700)]
    ).astype(np.float32)
    binner = TensorBinner(build_tensor_ref("x", "input", data, width=3, top_k=6))
    assert [f.kind for f in binner.ref.features] == ["categorical", "numeric", "categorical"]
    live = np.array([[0, 0.1, -2], [5, 1.0, 1], [2.5, np.nan, np.inf], [np.nan, 3.0, 7]])
    vectorised = binner.count_flat(live)
    one_by_one = binner.count_flat(live.astype(object))  # object rows take the dict path
    assert vectorised.tolist() == one_by_one.tolist()
    (first, _, third) = binner.count(live)
    # 0 and 5 are categories, 2.5 is other, NaN is missing.
    assert first[-1] == 1 and first[-2] == 1 and sum(first) == 4
    assert third[-2] == 2 and sum(third) == 4  # inf and 7 are other


def test_a_dynamic_width_is_summarised_without_projection_and_must_stay_dynamic() -> None:
    from modelfleet.kernel.bundle import TensorSpec
    from modelfleet.kernel.reference import check_reference

    rows = np.random.default_rng(2).standard_normal((600, 7)).astype(np.float32)
    t = build_tensor_ref("seq", "input", rows, width=0)
    assert t.reduction == "summary" and t.projection_dims == 0 and len(t.features) == 2
    window = DriftWindow(Reference(600, (t,)))
    window.add({"seq": rows[:3, :5]})  # another length per request is fine for a summary
    assert window.snapshot().rows == {"seq": 3}
    dynamic = (TensorSpec("seq", "FP32", (-1, -1)),)
    check_reference(Reference(600, (t,)), dynamic, (), "ref")
    claimed = TensorRef("seq", "input", "summary", 10**9, t.features, 1, 8)
    with pytest.raises(BundleError, match=r"1000000000 values per row .* a dynamic number"):
        check_reference(Reference(600, (claimed,)), dynamic, (), "ref")
