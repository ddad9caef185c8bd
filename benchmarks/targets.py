"""Issue #8's CPU targets, judged from one run's result (`run.py --cpu-targets`): each row says what was measured,
against what, and whether the target is met. Ratios come from engines measured back to back in that run."""
from __future__ import annotations

PEER = "optimum-openvino"  # optimum-intel, the CPU's default precision, static shapes
INT8 = "sdrt-openvino-int8q"  # int8 activations and weights (`sdrt convert --weights int8 --quantize-unet`)
GENAI = "openvino-genai"
LCM_LORA = ("sdrt-openvino-lcm-lora", "sdrt-openvino-int8q-lcm-lora")  # issue 19: LCM-LoRA, bf16 and int8
LCM_LORA_IMAGE_RATIO = 0.15  # issue 19: LCM-LoRA image <= 0.15x optimum-intel's 20-step image
TARGET_SIZE = 512
GIB = 2**30


def evaluate(result: dict) -> list[dict]:
    """[{"target", "measured", "met"}]; met is None where the run lacks the data (an engine failed, a part skipped)."""
    engines = {e["engine"]: e["result"] for e in result["engines"] if "result" in e}
    sdrt = {name: r for name, r in engines.items() if name.startswith("sdrt-openvino")}
    peer, int8 = engines.get(PEER), engines.get(INT8)
    rows = []

    def add(target: str, measured: str, met: bool | None, sized: bool = True) -> None:
        rows.append({"target": target, "measured": measured, "met": met, "sized": sized})

    def ratio(name: str, key: str) -> tuple[str, float | None]:
        if peer is None or name not in engines:
            return f"{name} or {PEER} missing", None
        value = engines[name][key] / peer[key]
        return f"{name} {engines[name][key]:.3f} / {peer[key]:.3f} = **{value:.2f}x**", value

    best = min(sdrt, key=lambda n: sdrt[n]["step_s"], default=None)
    text, value = ratio(best, "step_s") if best else ("no sdrt engine", None)
    add("guided UNet step, best precision, <= 0.8x optimum-intel", text, _le(value, 0.8))
    text, value = ratio(INT8, "step_s")
    add("int8 (activations too) step <= 0.5x", text, _le(value, 0.5))
    add(*_quality(result.get("quant_quality")), sized=False)
    text, value = ratio(INT8, "image_s")
    add(f"{result['settings']['steps']}-step image <= 0.6x", text, _le(value, 0.6))
    warm = {n: r["warm_start_s"] for n, r in sdrt.items() if r.get("warm_start_s") is not None}
    first = min(warm, key=warm.get, default=None)
    if first:
        r = sdrt[first]
        peer_first = f"; {PEER} first-ever {peer['import_s'] + peer['cold_start_s']:.1f} s" if peer else ""
        add("start with a warm compiled-model cache <= 4 s",
            f"{first} **{warm[first]:.1f} s** (first-ever: {r['import_s'] + r['cold_start_s']:.1f} s{peer_first})",
            warm[first] <= 4)
    else:
        add("start with a warm compiled-model cache <= 4 s", "not measured", None)
    lean = min(sdrt, key=lambda n: sdrt[n]["peak_rss_bytes"], default=None)
    if lean:
        r = sdrt[lean]
        warm_rss = f", warm cache {r['warm_peak_rss_bytes'] / GIB:.2f} GiB" if r.get("warm_peak_rss_bytes") else ""
        peer_rss = f" ({PEER} {peer['peak_rss_bytes'] / GIB:.2f} GiB)" if peer else ""
        add("peak resident memory <= 4 GiB", f"{lean} **{r['peak_rss_bytes'] / GIB:.2f} GiB**{warm_rss}{peer_rss}",
            r["peak_rss_bytes"] <= 4 * GIB)
    add(*_install(result.get("install")), sized=False)
    add(*_flops(result, int8))
    if result["settings"]["size"] != TARGET_SIZE:  # the targets are at 512x512
        for row in (r for r in rows if r["sized"]):
            row["measured"] += f" (at {result['settings']['size']}x{result['settings']['size']})"
            row["met"] = None
    return rows


def _le(value: float | None, bound: float) -> bool | None:
    return None if value is None else value <= bound


def _quality(q: dict | None) -> tuple[str, str, bool | None]:
    target = "int8 image PSNR vs fp32, shipped model, fixed prompt set, >= 30 dB"
    if not q:
        return target, "not measured", None
    f32, default, baseline = q["int8_f32_vs_fp32_f32"], q["int8_default_vs_fp32_f32"], q["fp32_default_vs_fp32_f32"]
    n, precision = len(f32["per_image_db"]), q["default_precision"]
    return (target, f"{n} images, int8 vs fp32 (both f32): mean **{f32['mean_db']} dB**, median {f32['median_db']}, "
                    f"min {f32['min_db']}; int8 in {precision}: mean {default['mean_db']}; for scale, fp32 in "
                    f"{precision}: mean {baseline['mean_db']}, min {baseline['min_db']}; conversion gate image "
                    f"{q['conversion_gate_db']} dB; int8 on {q['int8_activations']}",
            f32["mean_db"] >= q["min_psnr_db"] and q["conversion_gate_db"] >= q["min_psnr_db"])


def _install(install: dict | None) -> tuple[str, str, bool | None]:
    target = "runtime install within 5 % of the bare floor"
    if not install:
        return target, "not measured", None
    path = install["paths"]["openvino"]
    sdrt, floor = path["sdrt"]["size_bytes"], path["floor"]["size_bytes"]
    model = sum(p.get("model_bytes", 0) for p in path["added"].values())
    over = sdrt / floor - 1
    return target, (f"sdrt[openvino] {sdrt / 1e6:.0f} MB vs openvino + numpy + Pillow + tokenizers {floor / 1e6:.0f} "
                    f"MB: **{over:+.1%}** (the demo model: {model / 1e6:.1f} MB)"), over <= 0.05


def _flops(result: dict, int8: dict | None) -> tuple[str, str, bool | None]:
    target = "achieved GFLOP/s against the bf16 matmul peak, per-op profile"
    profile, flops = result.get("profile"), result.get("flops")
    if int8 is None or not flops:
        return target, "not measured", None
    gflops = flops["unet_step_flops"] / int8["step_s"] / 1e9
    peak = flops["matmul_peak_flops"]["bf16"] / 1e9
    shares = ", ".join(f"{k} {v:.0%}" for k, v in (profile or {}).get("share", {}).items() if v >= 0.02)
    return target, f"{INT8} {gflops:.0f} GFLOP/s = {gflops / peak:.0%} of {peak:.0f}; {shares or 'no profile'}", \
        bool(profile)


def lcm_lora(result: dict) -> list[dict]:
    """Issue 19: an image with LCM-LoRA (4 LCM steps, guidance off) against optimum-intel's default 20 steps, and
    the step times and OpenVINO GenAI's image beside it."""
    engines = {e["engine"]: e["result"] for e in result["engines"] if "result" in e}
    peer, genai, steps = engines.get(PEER), engines.get(GENAI), result["settings"]["steps"]
    rows = []
    for name in LCM_LORA:
        lcm = engines.get(name)
        if lcm is None or peer is None:
            rows.append({"target": f"{name} image <= {LCM_LORA_IMAGE_RATIO}x", "measured": "missing", "met": None})
            continue
        ratio = lcm["image_s"] / peer["image_s"]
        peers = f"{PEER} {peer['image_s']:.1f} s ({steps} steps, {peer['step_s']:.3f} s/step)"
        if genai:
            peers += f", {GENAI} {genai['image_s']:.1f} s ({genai['step_s']:.3f} s/step)"
        rows.append({
            "target": f"{name} image <= {LCM_LORA_IMAGE_RATIO}x {PEER}'s {steps}-step image",
            "measured": f"{lcm['image_s']:.1f} s ({lcm['unet_evaluations']} {lcm.get('sampler', '?')} steps, "
                        f"{lcm['step_s']:.3f} s/step) / {peers} = **{ratio:.3f}x**",
            "met": ratio <= LCM_LORA_IMAGE_RATIO if result["settings"]["size"] == TARGET_SIZE else None,
        })
    return rows


def markdown(rows: list[dict], title: str = "#8 target") -> str:
    mark = {True: "met", False: "**missed**", None: "-"}
    lines = [f"| {title} | measured | |", "|---|---|---|"]
    lines += [f"| {r['target']} | {r['measured']} | {mark[r['met']]} |" for r in rows]
    return "\n".join(lines)
