//! The fields the X-ray centring service needs from one per-image analysis
//! message (a recipe envelope, `docs/wire-format.md` §2), read in one pass
//! without building the envelope.
//!
//! This is the fast path for the plain, well-formed message that every
//! spot finder sends. Anything else (a field of another type, a DCID written
//! in a way only Python's rules accept, a group that cannot be, invalid or
//! duplicate-keyed JSON) gives `None`, and the caller reads the message the
//! slow way, which accepts or rejects it with the reason. So this function
//! never decides that a message is bad; it only recognises good ones.

use crate::json::{Kind, Parser};

/// What the service takes from one message.
#[derive(Debug, Clone, PartialEq)]
pub struct PiaFields {
    pub dcid: u64,
    /// The group's DCIDs, ascending, this one included (one or two).
    pub group: Vec<u64>,
    pub experiment_type: String,
    /// Where the current step's `gridinfo` object lies in the body.
    pub gridinfo: (usize, usize),
    pub file_number: u64,
    pub spots: u64,
    pub seen_at: Option<f64>,
}

/// The fields of a plain per-image message, or `None` (read it the slow way).
pub fn pia_fields(body: &[u8]) -> Option<PiaFields> {
    let mut p = Parser::new(body);
    let mut recipe = None;
    let mut pointer: Option<i64> = None;
    let mut payload = None;
    let mut seen = [false; 5];
    let mut key = p.object().ok()?;
    while let Some(k) = key {
        let slot = match k.as_ref() {
            "recipe" => 0,
            "recipe-pointer" => 1,
            "payload" => 2,
            "recipe-path" => 3,
            "environment" => 4,
            _ => {
                p.skip().ok()?;
                key = p.object_next().ok()?;
                continue;
            }
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None; // a key twice: Python's reader keeps the last; leave it to that
        }
        match slot {
            0 => {
                recipe = Some(p.mark());
                if p.peek().ok()? != Kind::Object {
                    return None;
                }
                p.skip().ok()?;
            }
            1 => {
                let n = p.number().ok()?;
                pointer = Some(n.integer().ok()?);
            }
            2 => payload = Some(read_payload(&mut p)?),
            3 => {
                if p.peek().ok()? != Kind::Array {
                    return None;
                }
                p.skip().ok()?;
            }
            _ => {
                if p.peek().ok()? != Kind::Object {
                    return None;
                }
                p.skip().ok()?;
            }
        }
        key = p.object_next().ok()?;
    }
    p.finish().ok()?;
    let (file_number, spots, seen_at) = payload?;
    let step = pointer?.to_string();
    let mut r = p.clone_at(recipe?);
    let mut found = None;
    let mut key = r.object().ok()?;
    while let Some(k) = key {
        if k == step.as_str() {
            if found.is_some() {
                return None;
            }
            found = Some(read_step(&mut r)?);
        } else {
            r.skip().ok()?;
        }
        key = r.object_next().ok()?;
    }
    let (dcid, others, experiment_type, gridinfo) = found?;
    if others.contains(&dcid) || others.len() > 1 || (others.is_empty() && experiment_type == "Mesh3D") {
        return None; // a group that cannot be: the slow way says why
    }
    let mut group = vec![dcid];
    group.extend(others);
    group.sort_unstable();
    Some(PiaFields { dcid, group, experiment_type, gridinfo, file_number, spots, seen_at })
}

/// `file-number` (>= 1), `n_spots_total` (>= 0), `file-seen-at` (optional).
fn read_payload(p: &mut Parser) -> Option<(u64, u64, Option<f64>)> {
    let (mut file_number, mut spots, mut seen_at) = (None, None, None);
    let mut key = p.object().ok()?;
    while let Some(k) = key {
        match k.as_ref() {
            "file-number" if file_number.is_none() => file_number = Some(whole(p, 1)?),
            "n_spots_total" if spots.is_none() => spots = Some(whole(p, 0)?),
            "file-seen-at" if seen_at.is_none() => {
                seen_at = Some(if p.peek().ok()? == Kind::Null {
                    p.null().ok()?;
                    None
                } else {
                    let f = p.float().ok()?;
                    if !f.is_finite() {
                        return None;
                    }
                    Some(f)
                })
            }
            "file-number" | "n_spots_total" | "file-seen-at" => return None,
            _ => p.skip().ok()?,
        }
        key = p.object_next().ok()?;
    }
    Some((file_number?, spots?, seen_at.flatten()))
}

/// A JSON integer of at least `least` (and below 2^63).
fn whole(p: &mut Parser, least: i64) -> Option<u64> {
    let v = p.number().ok()?.integer().ok()?;
    (v >= least).then_some(v as u64)
}

type Step = (u64, Vec<u64>, String, (usize, usize));

/// The current step: its `parameters` (DCID, other DCIDs, experiment type)
/// and where its `gridinfo` object lies.
fn read_step(p: &mut Parser) -> Option<Step> {
    let (mut parameters, mut gridinfo) = (None, None);
    let mut key = p.object().ok()?;
    while let Some(k) = key {
        match k.as_ref() {
            "parameters" if parameters.is_none() => parameters = Some(read_parameters(p)?),
            "gridinfo" if gridinfo.is_none() => {
                let start = p.mark();
                if p.peek().ok()? != Kind::Object {
                    return None;
                }
                p.skip().ok()?;
                let end = p.mark();
                gridinfo = Some((start.position(), end.position()));
            }
            "parameters" | "gridinfo" => return None,
            _ => p.skip().ok()?,
        }
        key = p.object_next().ok()?;
    }
    let (dcid, others, experiment_type) = parameters?;
    Some((dcid?, others, experiment_type, gridinfo?))
}

fn read_parameters(p: &mut Parser) -> Option<(Option<u64>, Vec<u64>, String)> {
    let (mut dcid, mut others, mut experiment_type) = (None, None, None);
    let mut key = p.object().ok()?;
    while let Some(k) = key {
        match k.as_ref() {
            "dcid" if dcid.is_none() => dcid = Some(id(p)?),
            "dcg_dcids" if others.is_none() => {
                let mut ids = Vec::new();
                if p.peek().ok()? == Kind::Null {
                    p.null().ok()?;
                } else {
                    let mut more = p.array().ok()?;
                    while more {
                        ids.push(id(p)?);
                        more = p.array_next().ok()?;
                    }
                }
                others = Some(ids);
            }
            "experiment_type" if experiment_type.is_none() => {
                experiment_type = Some(if p.peek().ok()? == Kind::Null {
                    p.null().ok()?;
                    String::new()
                } else {
                    p.string().ok()?.into_owned()
                })
            }
            "dcid" | "dcg_dcids" | "experiment_type" => return None,
            _ => p.skip().ok()?,
        }
        key = p.object_next().ok()?;
    }
    Some((dcid, others.unwrap_or_default(), experiment_type.unwrap_or_default()))
}

/// A DCID: a non-negative JSON integer, or a string of ASCII digits.
fn id(p: &mut Parser) -> Option<u64> {
    match p.peek().ok()? {
        Kind::Number => u64::try_from(p.number().ok()?.integer().ok()?).ok(),
        Kind::String => {
            let s = p.string().ok()?;
            if s.is_empty() || s.len() > 18 || !s.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(step: &str, payload: &str) -> String {
        format!(
            r#"{{"environment": {{"ID": "e"}}, "payload": {payload}, "recipe": {{"1": {{"queue": "x"}}, "2": {step}, "start": [[1, []]]}}, "recipe-path": [1], "recipe-pointer": 2}}"#
        )
    }

    const STEP: &str = r#"{"gridinfo": {"steps_x": 3, "steps_y": 2}, "parameters": {"dcid": "17", "dcg_dcids": [12], "experiment_type": "Mesh3D"}}"#;

    #[test]
    fn a_plain_message() {
        let b = body(STEP, r#"{"file-number": 4, "n_spots_total": 9, "file-seen-at": 1.5}"#);
        let f = pia_fields(b.as_bytes()).unwrap();
        assert_eq!((f.dcid, f.group.clone(), f.file_number, f.spots, f.seen_at), (17, vec![12, 17], 4, 9, Some(1.5)));
        assert_eq!(&b[f.gridinfo.0..f.gridinfo.1], r#"{"steps_x": 3, "steps_y": 2}"#);
        assert_eq!(f.experiment_type, "Mesh3D");
    }

    #[test]
    fn anything_unusual_is_left_to_the_slow_way() {
        for (step, payload) in [
            (STEP, r#"{"file-number": 0, "n_spots_total": 9}"#),
            (STEP, r#"{"file-number": 4.0, "n_spots_total": 9}"#),
            (STEP, r#"{"file-number": 4, "n_spots_total": -1}"#),
            (STEP, r#"{"file-number": 4, "file-number": 5, "n_spots_total": 1}"#),
            (STEP, r#"{"n_spots_total": 1}"#),
            (STEP, r#"[]"#),
            (r#"{"gridinfo": {}, "parameters": {"dcid": " 17"}}"#, r#"{"file-number": 1, "n_spots_total": 1}"#),
            (r#"{"gridinfo": {}, "parameters": {"dcid": 17, "dcg_dcids": [17]}}"#, r#"{"file-number": 1, "n_spots_total": 1}"#),
            (r#"{"gridinfo": {}, "parameters": {"dcid": 17, "dcg_dcids": [1, 2]}}"#, r#"{"file-number": 1, "n_spots_total": 1}"#),
            (r#"{"gridinfo": {}, "parameters": {"dcid": 17, "experiment_type": "Mesh3D"}}"#, r#"{"file-number": 1, "n_spots_total": 1}"#),
            (r#"{"gridinfo": [], "parameters": {"dcid": 17}}"#, r#"{"file-number": 1, "n_spots_total": 1}"#),
            (r#"{"parameters": {"dcid": 17}}"#, r#"{"file-number": 1, "n_spots_total": 1}"#),
        ] {
            assert_eq!(pia_fields(body(step, payload).as_bytes()), None, "{step} {payload}");
        }
        assert_eq!(pia_fields(b"{\"recipe\": {}, \"recipe-pointer\": 2, \"payload\": {}}"), None);
        assert_eq!(pia_fields(b"not json"), None);
    }

    #[test]
    fn a_2d_message_and_a_null_time() {
        let step = r#"{"gridinfo": {}, "parameters": {"dcid": 5, "dcg_dcids": null}}"#;
        let f = pia_fields(body(step, r#"{"file-number": 1, "n_spots_total": 0, "file-seen-at": null}"#).as_bytes()).unwrap();
        assert_eq!((f.group, f.seen_at, f.experiment_type.as_str()), (vec![5], None, ""));
    }
}
