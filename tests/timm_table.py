"""The README's timm coverage table, over a fixed list of architectures across timm's families.

    python tests/timm_table.py                 # print the table (a few minutes per 20 models)
    python tests/timm_table.py --write         # replace the table in README.md
    python tests/timm_table.py --models a b    # only these (printed, not written)

For each architecture (random weights with non-zero biases and random BatchNorm statistics,
float64, batch 2, at the smallest of 64/96/128/224/240/256 px it runs at): whether ``lrpx.convert``
converts it with ``epsilon_gamma_box`` or the error (the modules it names), how it converts
(which modules take their rules at run time), the forward error relative to the original, and
the accounting error |input relevance + absorbed - logit| / |logit| (``tests/zoo.py``).
``tests/test_timm.py`` runs the architectures that pass, at the same settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import lrpx  # noqa: E402
from test_coverage import _explain_and_account  # noqa: E402
from test_timm import randomized_at  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- timm:start -->", "<!-- timm:end -->"

#: the architectures of the table, by family
ARCHITECTURES = [
    # ResNet and variants
    "resnet10t", "resnet18", "resnet26", "resnet34", "resnet50", "resnet18d", "resnet50d", "seresnet18", "seresnet50",
    "ecaresnet26t", "skresnet18", "resnest14d", "resnest26d", "resnext26ts", "resnext50_32x4d", "res2net50_26w_4s",
    "res2next50", "resnetv2_50", "resnetv2_50x1_bit", "cspresnet50", "cspdarknet53", "darknet53", "dla34", "dla46_c",
    "dpn68", "hrnet_w18_small", "selecsls42b", "gernet_s", "ese_vovnet19b_dw", "nf_resnet26", "nfnet_l0",
    # RegNet
    "regnetx_002", "regnetx_004", "regnety_002", "regnety_004", "regnetz_b16",
    # EfficientNet, MobileNet and NAS nets
    "efficientnet_b0", "efficientnet_lite0", "efficientnet_es", "efficientnetv2_rw_t", "tf_efficientnetv2_b0",
    "mixnet_s", "tinynet_a", "mnasnet_100", "mnasnet_small", "spnasnet_100", "fbnetc_100", "semnasnet_075",
    "hardcorenas_a", "mobilenetv2_050", "mobilenetv2_100", "mobilenetv3_small_050", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "mobilenetv4_conv_small", "lcnet_050", "ghostnet_050", "ghostnetv2_100",
    "repghostnet_050", "rexnet_100",
    # ConvNeXt, DenseNet, Inception, VGG
    "convnext_atto", "convnext_femto", "convnextv2_atto", "convnextv2_femto", "densenet121", "inception_v3",
    "xception41", "vgg11", "vgg11_bn", "repvgg_a0", "inception_next_tiny", "hgnet_tiny", "hgnetv2_b0", "starnet_s1",
    # ViT and relatives
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_tiny_r_s16_p8_224", "vit_relpos_small_patch16_224",
    "vit_srelpos_small_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
    "deit3_small_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224",
    "xcit_nano_12_p16_224", "pit_ti_224", "pit_ti_distilled_224", "visformer_tiny", "crossvit_tiny_240",
    "tnt_s_patch16_224", "pvt_v2_b0", "twins_svt_small",
    # window and grid attention, hybrids
    "swin_tiny_patch4_window7_224", "swinv2_tiny_window8_256", "swinv2_cr_tiny_ns_224", "maxvit_tiny_rw_224",
    "maxvit_rmlp_nano_rw_256", "maxxvit_rmlp_nano_rw_256", "coatnet_nano_rw_224", "levit_128s", "levit_conv_128s",
    "efficientformer_l1", "efficientformerv2_s0", "mobilevit_xxs", "mobilevitv2_050", "edgenext_xx_small",
    "fastvit_t8", "botnet26t_256", "halonet26t", "lambda_resnet26t",
    # MLPs and MetaFormers
    "mixer_s16_224", "resmlp_12_224", "gmlp_ti16_224", "poolformer_s12", "poolformerv2_s12", "convformer_s18",
    "caformer_s18", "sequencer2d_s",
]


def row(name: str) -> tuple[str, ...]:
    try:
        model, size = randomized_at(name)
    except Exception as err:  # noqa: BLE001 - reported in the table
        return name, "-", f"does not build here: {type(err).__name__}", "-", "-", "-"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64).clamp(-3, 3)
    try:
        lrp = lrpx.convert(model, lrpx.composites.epsilon_gamma_box(low=-3.0, high=3.0))
    except lrpx.UnsupportedModuleError as err:
        names = sorted({cls.__name__ for _, cls in err.modules})
        return name, f"{size}²", "refused: no rule for " + ", ".join(f"`{n}`" for n in names), "-", "-", "-"
    except Exception as err:  # noqa: BLE001
        return name, f"{size}²", f"refused: {type(err).__name__}", "-", "-", "-"
    how = "run-time rules in " + ", ".join(sorted({type(lrp.get_submodule(n)).__name__ for n in lrp.lrpx_graph.oplevel})) \
        if lrp.lrpx_graph.oplevel else "traced"
    try:
        with torch.no_grad():
            ref, out = model(x), lrp(x)
        forward = ((out - ref).abs().max() / ref.abs().max()).item()
        rel, logit_sum, absorbed = _explain_and_account(lrp, x)
        accounting = ((rel.sum() + absorbed - logit_sum).abs() / logit_sum.abs()).item()
    except Exception as err:  # noqa: BLE001 - reported in the table
        return name, f"{size}²", f"converts; fails to run: {type(err).__name__}", how, "-", "-"
    status = "converts" if accounting <= 1e-8 and forward <= 1e-8 else "converts; accounting open"
    return name, f"{size}²", status, how, f"{forward:.0e}", f"{accounting:.0e}"


def table(names: list[str]) -> str:
    head = ("architecture", "tested at", "result (`epsilon_gamma_box`)", "forward code", "forward error",
            "accounting error")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = row(name)
        print(" | ".join(cells), file=sys.stderr, flush=True)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--models", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = table(args.models or ARCHITECTURES)
    if args.write and not args.models:
        readme = README.read_text()
        start, end = readme.index(START) + len(START), readme.index(END)
        README.write_text(readme[:start] + "\n" + text + "\n" + readme[end:])
    else:
        print(text)


if __name__ == "__main__":
    main()
