"""Pure objective functions: tensors in, ``(loss, metrics)`` out; no forward passes.

Functions:
    dpo_loss                    sigmoid / conservative DPO on summed sequence log-probs (Rafailov et al. 2023)
    ipo_loss                    IPO on length-averaged sequence log-probs (Azar et al. 2023)
    selm_loss                   SELM: sigmoid DPO + alpha beta log-ratio on the reference's own response (Zhang et al. 2024)
    nll_loss                    negative log-likelihood of masked tokens, token- or sequence-averaged
    gradient_ascent_loss        minus the NLL of the forget tokens (GA, GradDiff, LLMU's forget term)
    npo_loss                    Negative Preference Optimization on (B,) policy / reference log-probs (Zhang et al. 2024)
    label_smoothed_ascent_loss  UGradSL: ascent on (negatively) label-smoothed token targets (Di et al.)
    gls_cross_entropy           generalised-label-smoothing cross-entropy for classification (any alpha <= 1)
    gls_from_logps              the GLS formula from log-probs (shared by the two above)
    ugradsl_objective           UGradSL on classifiers: p CE(retain) - (1 - p) GLS(forget), mean or sum
    adaptive_alpha              UGradSL's per-forget-sample rate from feature distances (sign an option)
    kl_loss                     masked mean of per-token KL (or cross-entropy) to a reference
    kl_shaped_rewards           PPO per-token rewards: -beta (log pi_old - log pi_ref) + the clipped terminal score
    gae                         generalised advantage estimation over response tokens (gamma, lambda)
    ppo_policy_loss             clipped PPO surrogate, token-averaged (clip fraction, approximate KL)
    ppo_value_loss              clipped value loss, token-averaged
    whiten                      masked whitening (advantage normalisation)
    bradley_terry_loss          reward models: -log sigmoid(r_c - r_r - margin) (+ a centring penalty)
    rloo_advantages             RLOO: each sample's reward minus the mean of its prompt's other samples
    grpo_advantages             GRPO: group-normalised rewards (optionally without the std scaling)
    detector_loss               watermark detector: pairwise -log sigmoid(s_w - s_h) + score penalty
    detector_objective          watermark detector: the main pair + weighted robustness pairs (DetectorPair)
    away_loss                   C-AdvUL away term: -CE with a soft floor, or log(1 - p) (Xhonneux et al. 2024)
    toward_loss                 C-AdvUL toward term: CE with a soft floor
    windowed_mean_logps         C-AdvIPO: length-averaged log-probs with low-probability tokens zeroed
    fairness_loss               FIS: mu/2 ||Delta||^2 of a relaxed DP / EOp / EOd gap on probabilities (Pang et al.)
    fairness_gaps               FIS: the relaxed gap vector Delta
    accuracy_loss               FIS: the validation accuracy loss (mean cross-entropy)

Config objects (selected from YAML by ``class_path``):
    PreferenceLoss   base: ``loss(pc, pr, rc, rr) -> (loss, metrics)`` and the ``reduction``
                     its inputs need
    DPOLoss          ``dpo_loss`` with ``beta`` and ``label_smoothing``
    IPOLoss          ``ipo_loss`` with ``beta``
    SELMLoss         ``selm_loss`` with ``beta`` and ``alpha`` (sigmoid only)
    UnlearningTerm   base of the unlearning terms: ``term(stats, ref_logps, kl) -> (loss, metrics)``,
                     with the batch part it reads (``target``) and what it needs computed (``needs_*``)
    GradientAscent   forget: gradient ascent
    NPO              forget: NPO, ``reduction`` "sum_sequence" (paper) or "mean_token" (WAGLE code)
    LabelSmoothedAscent  forget: UGradSL's label-smoothed ascent
    Refusal          forget (PO): NLL of a refusal answer to the forget prompt
    RetainNLL        retain: NLL
    RetainKL         retain: per-token KL to the reference (LLMU's normal-data term)
    MismatchNLL      LLMU: NLL of random normal answers to the forget prompts
    CAdvUL           continuous adversarial training: weighted away + toward terms under the attack
    CAdvIPO          continuous adversarial training: IPO on windowed mean log-probs under the attack
"""

from lit_align.losses.adversarial import CAdvIPO, CAdvUL, away_loss, soft_floor, toward_loss, windowed_mean_logps
from lit_align.losses.fairness import FAIRNESS_KINDS, accuracy_loss, fairness_gaps, fairness_loss
from lit_align.losses.group import grpo_advantages, rloo_advantages
from lit_align.losses.ppo import gae, kl_shaped_rewards, ppo_policy_loss, ppo_value_loss, whiten
from lit_align.losses.preference import DPOLoss, IPOLoss, PreferenceLoss, SELMLoss, dpo_loss, ipo_loss, selm_loss
from lit_align.losses.reward import bradley_terry_loss
from lit_align.losses.sft import nll_loss
from lit_align.losses.ugradsl import adaptive_alpha, feature_distances, ugradsl_objective
from lit_align.losses.unlearning import (
    NPO,
    GradientAscent,
    LabelSmoothedAscent,
    MismatchNLL,
    Refusal,
    RetainKL,
    RetainNLL,
    UnlearningTerm,
    gls_cross_entropy,
    gls_from_logps,
    gradient_ascent_loss,
    kl_loss,
    label_smoothed_ascent_loss,
    npo_loss,
)
from lit_align.losses.watermark import DetectorPair, detector_loss, detector_objective

__all__ = [
    "CAdvIPO",
    "CAdvUL",
    "away_loss",
    "soft_floor",
    "toward_loss",
    "windowed_mean_logps",
    "bradley_terry_loss",
    "FAIRNESS_KINDS",
    "accuracy_loss",
    "fairness_gaps",
    "fairness_loss",
    "DetectorPair",
    "detector_loss",
    "detector_objective",
    "DPOLoss",
    "GradientAscent",
    "IPOLoss",
    "LabelSmoothedAscent",
    "MismatchNLL",
    "NPO",
    "PreferenceLoss",
    "Refusal",
    "SELMLoss",
    "RetainKL",
    "RetainNLL",
    "UnlearningTerm",
    "dpo_loss",
    "gae",
    "gls_cross_entropy",
    "gls_from_logps",
    "adaptive_alpha",
    "feature_distances",
    "ugradsl_objective",
    "grpo_advantages",
    "gradient_ascent_loss",
    "ipo_loss",
    "kl_loss",
    "kl_shaped_rewards",
    "label_smoothed_ascent_loss",
    "nll_loss",
    "npo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "selm_loss",
    "whiten",
]
