//! Fine-tuning controls as data (no libtorch): the model's *parts* by parameter-name
//! prefix, which parameters a `train.freeze` / `train.lr_mult` entry selects, and which
//! linear layers a `train.lora_targets` entry adapts.
//!
//! The parts, defined once here (the trainer, the README and the config checks use this
//! table):
//!
//! | part         | parameters                                                        |
//! |--------------|-------------------------------------------------------------------|
//! | `vision`     | `vision.*`: patch embedding, positions, blocks, pooler, projection |
//! | `text`       | `text.*` except `text.multimodal.*`: token embedding, positions, unimodal blocks, text pooler and projection |
//! | `multimodal` | `text.multimodal.*` and `fusion.*`: the fused text layers          |
//! | `heads`      | `head.*`: captioning head, matching head, logit scale (and any later head) |
//!
//! An entry of `train.freeze` or a key of `train.lr_mult` is either a part name or a
//! dotted parameter-name prefix (`text.unimodal.0`, `vision.blocks.3.mlp`), which selects
//! the parameters whose name is the prefix or starts with `prefix.`. Where several
//! `lr_mult` keys select one parameter the most specific wins: a prefix over a part, a
//! longer prefix over a shorter one.

use std::collections::BTreeMap;

/// The parts: name, and the name prefixes that belong to it, checked in this order (the
/// first part with a matching prefix owns the parameter).
pub const PARTS: [(&str, &[&str]); 4] = [
    ("multimodal", &["text.multimodal.", "fusion."]),
    ("vision", &["vision."]),
    ("text", &["text."]),
    ("heads", &["head."]),
];

/// The part names, in the order the README lists them.
pub const PART_NAMES: [&str; 4] = ["vision", "text", "multimodal", "heads"];

/// The part that owns parameter `name` (`None` for a parameter under no part's prefix).
pub fn part_of(name: &str) -> Option<&'static str> {
    PARTS
        .iter()
        .find(|(_, prefixes)| prefixes.iter().any(|p| name.starts_with(p)))
        .map(|(part, _)| *part)
}

/// Whether `entry` names a part.
pub fn is_part(entry: &str) -> bool {
    PART_NAMES.contains(&entry)
}

/// Whether the `freeze`/`lr_mult` entry `entry` selects parameter `name`.
pub fn selects(entry: &str, name: &str) -> bool {
    if is_part(entry) {
        return part_of(name) == Some(entry);
    }
    name == entry || (name.starts_with(entry) && name.as_bytes().get(entry.len()) == Some(&b'.'))
}

/// How specific an entry is (a part 0, a prefix its length + 1).
fn specificity(entry: &str) -> usize {
    if is_part(entry) {
        0
    } else {
        entry.len() + 1
    }
}

/// The learning-rate multiplier of parameter `name` under `mults` (1 where no key selects
/// it; the most specific key where several do).
pub fn lr_mult_of(mults: &BTreeMap<String, f64>, name: &str) -> f64 {
    mults
        .iter()
        .filter(|(k, _)| selects(k, name))
        .max_by_key(|(k, _)| specificity(k))
        .map_or(1.0, |(_, &m)| m)
}

/// Whether parameter `name` is frozen by the entries `freeze`.
pub fn frozen_by(freeze: &[String], name: &str) -> bool {
    freeze.iter().any(|e| selects(e, name))
}

/// The linear layers LoRA can adapt, named by the last two components of their weight's
/// prefix: the attention projections (self-attention `attn`, cross-attention `xattn`) and
/// the MLP layers (`mlp`, and the open_clip multimodal block's second MLP `xmlp`).
pub const LORA_TARGETS: [&str; 12] = [
    "attn.q", "attn.k", "attn.v", "attn.o", "xattn.q", "xattn.k", "xattn.v", "xattn.o", "mlp.fc1",
    "mlp.fc2", "xmlp.fc1", "xmlp.fc2",
];

/// Name suffix of a LoRA adapter's down projection `A` (`[rank, in]`), beside the adapted
/// layer's `weight`.
pub const LORA_A: &str = "lora_a";
/// Name suffix of a LoRA adapter's up projection `B` (`[out, rank]`).
pub const LORA_B: &str = "lora_b";

/// Whether parameter `name` is a LoRA factor.
pub fn is_lora(name: &str) -> bool {
    name.ends_with(&format!(".{LORA_A}")) || name.ends_with(&format!(".{LORA_B}"))
}

/// Whether the linear layer with name prefix `layer` (`text.unimodal.0.attn.q`) is one of
/// `targets`: its last two dotted components equal a target.
pub fn lora_targets_layer(targets: &[String], layer: &str) -> bool {
    let mut parts = layer.rsplit('.');
    let (Some(last), Some(before)) = (parts.next(), parts.next()) else {
        return false;
    };
    targets
        .iter()
        .any(|t| t.split_once('.') == Some((before, last)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_split_the_model_by_prefix() {
        assert_eq!(part_of("vision.blocks.0.attn.q.weight"), Some("vision"));
        assert_eq!(part_of("text.unimodal.1.mlp.fc1.bias"), Some("text"));
        assert_eq!(part_of("text.tok_embed.weight"), Some("text"));
        assert_eq!(
            part_of("text.multimodal.0.xattn.q.weight"),
            Some("multimodal")
        );
        assert_eq!(part_of("fusion.image_proj.weight"), Some("multimodal"));
        assert_eq!(part_of("head.logit_scale"), Some("heads"));
        assert_eq!(part_of("elsewhere.w"), None);
    }

    #[test]
    fn entries_select_parts_or_dotted_prefixes() {
        assert!(selects("text", "text.proj"));
        assert!(!selects("text", "text.multimodal.0.ln1.weight"));
        assert!(selects("text.unimodal.0", "text.unimodal.0.ln1.weight"));
        assert!(!selects("text.unimodal.0", "text.unimodal.01.ln1.weight"));
        assert!(selects("head.logit_scale", "head.logit_scale"));
        let m: BTreeMap<String, f64> = [("vision".into(), 0.1), ("vision.blocks.1".into(), 0.5)]
            .into_iter()
            .collect();
        assert_eq!(lr_mult_of(&m, "vision.pos"), 0.1);
        assert_eq!(lr_mult_of(&m, "vision.blocks.1.ln1.weight"), 0.5);
        assert_eq!(lr_mult_of(&m, "head.logit_scale"), 1.0);
    }

    #[test]
    fn lora_targets_match_the_last_two_components() {
        let t = vec!["attn.q".to_string(), "mlp.fc1".to_string()];
        assert!(lora_targets_layer(&t, "vision.blocks.0.attn.q"));
        assert!(!lora_targets_layer(&t, "text.multimodal.0.xattn.q"));
        assert!(lora_targets_layer(&t, "text.unimodal.0.mlp.fc1"));
        assert!(!lora_targets_layer(&t, "text.unimodal.0.mlp.fc2"));
        assert!(is_lora("a.attn.q.lora_a") && is_lora("a.attn.q.lora_b"));
        assert!(!is_lora("a.attn.q.weight"));
    }
}
