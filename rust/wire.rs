//! X-ray centring results on the wire (`docs/wire-format.md` §3-4): reading a
//! message body straight into typed rows, and writing the same shapes.
//!
//! A body is a recipe envelope whose `payload` is `{"results": [...],
//! "status": ..., "type": "2d" | "3d"}`, such a payload on its own, or the old
//! bare list of 3D results. 3D results are decoded in one pass into `Xrc3d`
//! rows; nothing is built per result but the row itself.

use crate::centre2d::Xrc2d;
use crate::error::excerpt;
use crate::centre3d::Xrc3d;
use crate::json::{AtPath, Error, Kind, Parser, Result};
use crate::pyrepr::write_float;
use std::fmt::Write;

/// A 2D result as it travels: every field of the wire shape, in wire order.
#[derive(Debug, Clone, PartialEq)]
pub struct Wire2d {
    pub centre_of_mass: Option<[f64; 2]>,
    pub max_voxel: Option<[i64; 2]>,
    pub max_count: Option<f64>,
    pub n_voxels: Option<i64>,
    pub total_count: Option<f64>,
    pub sample_id: Option<i64>,
    pub steps: [i64; 2],
    pub box_size_px: [f64; 2],
    pub snapshot_offset: [f64; 2],
    pub centre_x: Option<f64>,
    pub centre_y: Option<f64>,
    pub centre_x_box: Option<f64>,
    pub centre_y_box: Option<f64>,
    pub status: String,
    pub message: String,
    pub best_image: Option<i64>,
    pub reflections_in_best_image: Option<i64>,
    pub best_region: Option<Vec<[i64; 2]>>,
}

impl From<&Xrc2d> for Wire2d {
    fn from(r: &Xrc2d) -> Self {
        let f = r.found.as_ref();
        Wire2d {
            centre_of_mass: f.map(|f| f.centre_of_mass),
            max_voxel: f.map(|f| f.max_voxel),
            max_count: f.map(|f| f.max_count as f64),
            n_voxels: f.map(|f| f.n_voxels),
            total_count: f.map(|f| f.total_count as f64),
            sample_id: f.and_then(|f| f.sample_id),
            steps: r.steps,
            box_size_px: r.box_size_px,
            snapshot_offset: r.snapshot_offset,
            centre_x: f.map(|f| f.centre_x),
            centre_y: f.map(|f| f.centre_y),
            centre_x_box: f.map(|f| f.centre_of_mass[0]),
            centre_y_box: f.map(|f| f.centre_of_mass[1]),
            status: if f.is_some() { "ok" } else { "fail" }.to_owned(),
            message: if f.is_some() { "ok" } else { "No good images found" }.to_owned(),
            best_image: f.map(|f| f.best_image),
            reflections_in_best_image: f.map(|f| f.max_count),
            best_region: f.map(|f| f.best_region.clone()),
        }
    }
}

/// The results of one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Results {
    /// `"type": "3d"`: zero or more regions (none: no crystal).
    ThreeD(Vec<Xrc3d>),
    /// `"type": "2d"`: one result of the 2D shape.
    TwoD(Vec<Wire2d>),
}

/// A decoded results message.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultMessage {
    pub results: Results,
    /// The payload's `status` (`"success"`); None for the old bare list.
    pub status: Option<String>,
    pub dcid: Option<i64>,
    pub dcgid: Option<i64>,
    /// True when the counts came from the GPU spot finder.
    pub gpu: bool,
    pub environment_id: Option<String>,
}

/// Decode a message body (UTF-8 JSON).
pub fn parse_result_message(body: &[u8]) -> Result<ResultMessage> {
    let mut p = Parser::new(body);
    let message = match p.peek()? {
        Kind::Array => ResultMessage {
            results: Results::ThreeD(results_3d(&mut p)?),
            status: None,
            dcid: None,
            dcgid: None,
            gpu: false,
            environment_id: None,
        },
        Kind::Object => top_level(&mut p)?,
        other => {
            return Err(Error::new(format!(
                "expected a recipe envelope, a result payload or a list of results, got {}",
                other.described()
            )))
        }
    };
    p.finish()?;
    Ok(message)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    TwoD,
    ThreeD,
}

/// What a payload object has said so far; its keys may come in any order.
#[derive(Default)]
struct Payload {
    /// Where the `results` list is, and its rows if read as 3D already.
    results: Option<(crate::json::Mark, Option<Vec<Xrc3d>>)>,
    status: Option<String>,
    kind: Option<Type>,
    is_list: bool,
}

impl Payload {
    /// Read the member `key` if it is a payload field; false if it is not.
    fn member(&mut self, p: &mut Parser, key: &str) -> Result<bool> {
        match key {
            "results" if self.results.is_some() => return Err(duplicate(key)),
            "status" if self.status.is_some() => return Err(duplicate(key)),
            "type" if self.kind.is_some() => return Err(duplicate(key)),
            "results" => {
                let mark = p.mark();
                // 3D is the hot path; a 2D list (or a "type" after the list
                // that says 2D) is read again at the end.
                let rows = match self.kind {
                    Some(Type::TwoD) => {
                        p.skip()?;
                        None
                    }
                    _ => match results_3d(p) {
                        Ok(rows) => Some(rows),
                        Err(_) => {
                            p.reset(mark);
                            p.skip()?;
                            None
                        }
                    },
                };
                self.results = Some((mark, rows));
            }
            "status" => self.status = Some(p.string()?.into_owned()),
            "type" => {
                self.kind = Some(match &*p.string()? {
                    "3d" => Type::ThreeD,
                    "2d" => Type::TwoD,
                    other => return Err(Error::new(format!("expected \"2d\" or \"3d\", got {:?}", excerpt(other)))),
                })
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The payload value of an envelope: a payload object or the old bare list.
    fn read(p: &mut Parser) -> Result<Payload> {
        let mut payload = Payload::default();
        match p.peek()? {
            Kind::Array => {
                let mark = p.mark();
                payload.results = Some((mark, Some(results_3d(p)?)));
                payload.is_list = true;
            }
            Kind::Object => {
                let mut key = p.object()?;
                while let Some(k) = key {
                    if !payload.member(p, &k).in_key(&k)? {
                        p.skip().in_key(&k)?;
                    }
                    key = p.object_next()?;
                }
            }
            other => {
                return Err(Error::new(format!(
                    "expected a result payload (an object) or a list of results, got {}",
                    other.described()
                )))
            }
        }
        Ok(payload)
    }

    fn results(self, p: &Parser) -> Result<(Results, Option<String>)> {
        let Some((mark, rows)) = self.results else {
            return Err(Error::new("missing field 'results'"));
        };
        let results = match (self.kind.unwrap_or(Type::ThreeD), rows) {
            (Type::ThreeD, Some(rows)) => Results::ThreeD(rows),
            (kind, _) => {
                let mut q = p.clone_at(mark);
                match kind {
                    Type::ThreeD => Results::ThreeD(results_3d(&mut q).in_key("results")?),
                    Type::TwoD => Results::TwoD(results_2d(&mut q).in_key("results")?),
                }
            }
        };
        Ok((results, self.status))
    }
}

/// Parameters of one recipe step; kept as read and judged only for the
/// current step, so that odd values in other steps do no harm.
struct Step {
    id: String,
    dcid: Result<Option<i64>>,
    dcgid: Result<Option<i64>>,
    gpu: Result<bool>,
}

fn top_level(p: &mut Parser) -> Result<ResultMessage> {
    let mut bare = Payload::default();
    let mut payload = None;
    let mut steps: Option<Vec<Step>> = None;
    let mut pointer = None;
    let mut environment_id = None;
    let mut seen = 0u8;
    let mut key = p.object()?;
    while let Some(k) = key {
        if let Some(bit) = ["payload", "recipe", "recipe-pointer", "environment"].iter().position(|f| *f == k) {
            if seen & (1 << bit) != 0 {
                return Err(duplicate(&k));
            }
            seen |= 1 << bit;
        }
        match &*k {
            "payload" => payload = Some(Payload::read(p).in_key("payload")?),
            "recipe" => steps = Some(recipe(p).in_key("recipe")?),
            "recipe-pointer" => pointer = Some(p.int().in_key("recipe-pointer")?),
            "environment" => environment_id = environment(p).in_key("environment")?,
            other => {
                if !bare.member(p, other).in_key(other)? {
                    p.skip().in_key(other)?;
                }
            }
        }
        key = p.object_next()?;
    }
    let Some(payload) = payload else {
        if steps.is_some() {
            return Err(Error::new("missing field 'payload'"));
        }
        let (results, status) = bare.results(p)?;
        return Ok(ResultMessage { results, status, dcid: None, dcgid: None, gpu: false, environment_id });
    };
    let steps = steps.ok_or_else(|| Error::new("missing field 'recipe'"))?;
    let pointer = pointer.ok_or_else(|| Error::new("missing field 'recipe-pointer'"))?;
    let id = pointer.to_string();
    let step = steps
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(|| Error::new(format!("recipe-pointer: the recipe has no step {pointer}")))?;
    let at = |field: &str, e: Error| e.in_key(field).in_key("parameters").in_key(&id).in_key("recipe");
    let is_list = payload.is_list;
    let (results, status) = payload.results(p).in_key("payload")?;
    Ok(ResultMessage {
        results,
        status: if is_list { None } else { status },
        dcid: step.dcid.map_err(|e| at("dcid", e))?,
        dcgid: step.dcgid.map_err(|e| at("dcgid", e))?,
        gpu: step.gpu.map_err(|e| at("gpu", e))?,
        environment_id,
    })
}

fn environment(p: &mut Parser) -> Result<Option<String>> {
    let mut id = None;
    let mut key = p.object()?;
    while let Some(k) = key {
        if k == "ID" {
            if id.is_some() {
                return Err(duplicate(&k));
            }
            id = Some(p.string().in_key("ID")?.into_owned());
        } else {
            p.skip().in_key(&k)?;
        }
        key = p.object_next()?;
    }
    Ok(id)
}

fn recipe(p: &mut Parser) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut key = p.object()?;
    while let Some(k) = key {
        if !seen.insert(k.clone().into_owned()) {
            return Err(duplicate(&k));
        }
        if k != "start" && p.peek()? == Kind::Object {
            steps.push(step(p, &k).in_key(&k)?);
        } else {
            p.skip().in_key(&k)?;
        }
        key = p.object_next()?;
    }
    Ok(steps)
}

fn step(p: &mut Parser, id: &str) -> Result<Step> {
    let mut step = Step { id: id.to_owned(), dcid: Ok(None), dcgid: Ok(None), gpu: Ok(false) };
    let mut parameters_seen = false;
    let mut key = p.object()?;
    while let Some(k) = key {
        if k == "parameters" && parameters_seen {
            return Err(duplicate(&k));
        }
        if k == "parameters" && p.peek()? == Kind::Object {
            parameters_seen = true;
            let mut seen = 0u8;
            let mut param = p.object()?;
            while let Some(name) = param {
                if let Some(bit) = ["dcid", "dcgid", "gpu"].iter().position(|f| *f == name) {
                    if seen & (1 << bit) != 0 {
                        return Err(duplicate(&name)).in_key("parameters");
                    }
                    seen |= 1 << bit;
                }
                match &*name {
                    "dcid" => step.dcid = id_value(p).in_key("dcid").in_key("parameters")?,
                    "dcgid" => step.dcgid = id_value(p).in_key("dcgid").in_key("parameters")?,
                    "gpu" => {
                        step.gpu = match p.peek()? {
                            Kind::Bool => Ok(p.bool()?),
                            Kind::Null => p.null().map(|_| false),
                            other => {
                                p.skip()?;
                                Err(Error::new(format!("expected true or false, got {}", other.described())))
                            }
                        }
                    }
                    _ => p.skip().in_key(&name).in_key("parameters")?,
                }
                param = p.object_next()?;
            }
        } else {
            p.skip().in_key(&k)?;
        }
        key = p.object_next()?;
    }
    Ok(step)
}

/// A DCID: an integer, or (as Zocalo often sends it) a string of digits. The
/// outer result is a syntax error; the inner one a value that is no DCID.
fn id_value(p: &mut Parser) -> Result<Result<Option<i64>>> {
    Ok(match p.peek()? {
        Kind::Null => p.null().map(|_| None),
        Kind::Number => p.number()?.integer().map(Some),
        Kind::String => {
            let s = p.string()?;
            match s.parse::<i64>() {
                Ok(v) if s.bytes().all(|b| b.is_ascii_digit() || b == b'-') => Ok(Some(v)),
                _ => Err(Error::new(format!("expected an integer or a string of digits, got {:?}", excerpt(&s)))),
            }
        }
        other => {
            p.skip()?;
            Err(Error::new(format!("expected an integer or a string of digits, got {}", other.described())))
        }
    })
}

fn list_of<T>(p: &mut Parser, item: impl FnMut(&mut Parser) -> Result<T>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    list_into(p, &mut out, item)?;
    Ok(out)
}

fn list_into<T>(p: &mut Parser, out: &mut Vec<T>, mut item: impl FnMut(&mut Parser) -> Result<T>) -> Result<()> {
    let mut more = p.array_or(|| "a list".into())?;
    while more {
        out.push(item(p).in_index(out.len())?);
        more = p.array_next()?;
    }
    Ok(())
}

fn results_3d(p: &mut Parser) -> Result<Vec<Xrc3d>> {
    // A guess from the bytes left (a row takes ~200), bounded: what follows
    // the list may be anything, and the rows outlive the message's bytes.
    let mut rows = Vec::with_capacity((p.remaining() / 256).min(64));
    list_into(p, &mut rows, result_3d)?;
    rows.shrink_to_fit();
    Ok(rows)
}

fn results_2d(p: &mut Parser) -> Result<Vec<Wire2d>> {
    let rows = list_of(p, result_2d)?;
    if rows.len() != 1 {
        return Err(Error::new(format!("a 2d payload has exactly one result, got {}", rows.len())));
    }
    Ok(rows)
}

/// A list of exactly `N` values, each read by `item`; `what` names them.
#[inline]
fn fixed<const N: usize, T: Copy + Default>(
    p: &mut Parser,
    what: &str,
    mut item: impl FnMut(&mut Parser) -> Result<T>,
) -> Result<[T; N]> {
    let mut out = [T::default(); N];
    let mut n = 0;
    let mut more = p.array_or(|| format!("a list of {N} {what}"))?;
    while more {
        if n < N {
            out[n] = item(p).in_index(n)?;
        } else {
            p.skip().in_index(n)?;
        }
        n += 1;
        more = p.array_next()?;
    }
    if n != N {
        return Err(Error::new(format!("expected {N} {what}, got {n}")));
    }
    Ok(out)
}

fn floats<const N: usize>(p: &mut Parser) -> Result<[f64; N]> {
    fixed(p, "numbers", |p| p.float())
}

fn ints<const N: usize>(p: &mut Parser) -> Result<[i64; N]> {
    fixed(p, "integers", |p| p.int())
}

fn nullable<T>(p: &mut Parser, value: impl FnOnce(&mut Parser) -> Result<T>) -> Result<Option<T>> {
    if p.at(b'n') {
        p.null()?;
        Ok(None)
    } else {
        value(p).map(Some)
    }
}

/// A key given twice in one object: Python's `json` (and so `workflows`)
/// takes the last, other readers the first, so neither is taken.
fn duplicate(key: &str) -> Error {
    Error::new(format!("duplicate key {:?}: JSON readers disagree on which one counts", excerpt(key)))
}

/// Fail with the first of `names` whose bit is missing from `seen`.
fn require(seen: u32, required: u32, names: &[&str]) -> Result<()> {
    let missing = required & !seen;
    if missing == 0 {
        return Ok(());
    }
    Err(Error::new(format!("missing field '{}'", names[missing.trailing_zeros() as usize])))
}

const FIELDS_3D: [&str; 7] =
    ["centre_of_mass", "max_voxel", "max_count", "n_voxels", "total_count", "sample_id", "bounding_box"];

/// One 3D result. `sample_id` may be absent (older services did not send it).
fn result_3d(p: &mut Parser) -> Result<Xrc3d> {
    let mut r = Xrc3d {
        centre_of_mass: [0.0; 3],
        max_voxel: [0; 3],
        max_count: 0.0,
        n_voxels: 0,
        total_count: 0.0,
        sample_id: None,
        bounding_box: [[0; 3]; 2],
    };
    // Diamond's writer always sends the keys in this order: read them
    // straight through while it does, then take whatever keys remain.
    let mut seen = 0u32;
    let mut key = p.object()?;
    if key.as_deref() == Some(FIELDS_3D[0]) {
        r.centre_of_mass = floats(p).in_key(FIELDS_3D[0])?;
        seen = 1;
        let mut bit = 1;
        while bit < FIELDS_3D.len() && p.next_key_is(FIELDS_3D[bit]) {
            field_3d(p, &mut r, bit).in_key(FIELDS_3D[bit])?;
            seen |= 1 << bit;
            bit += 1;
        }
        key = p.object_next()?;
    }
    while let Some(k) = key {
        match FIELDS_3D.iter().position(|f| *f == k) {
            Some(bit) if seen & (1 << bit) != 0 => return Err(duplicate(&k)),
            Some(bit) => {
                field_3d(p, &mut r, bit).in_key(&k)?;
                seen |= 1 << bit;
            }
            None => p.skip().in_key(&k)?,
        }
        key = p.object_next()?;
    }
    require(seen, 0b101_1111, &FIELDS_3D)?;
    Ok(r)
}

/// Read field number `bit` of `FIELDS_3D` into `r`.
#[inline(always)]
fn field_3d(p: &mut Parser, r: &mut Xrc3d, bit: usize) -> Result<()> {
    match bit {
        0 => r.centre_of_mass = floats(p)?,
        1 => r.max_voxel = ints(p)?,
        2 => r.max_count = p.float()?,
        3 => r.n_voxels = p.int()?,
        4 => r.total_count = p.float()?,
        5 => r.sample_id = nullable(p, |p| p.int())?,
        _ => r.bounding_box = fixed(p, "lists of 3 integers", ints)?,
    }
    Ok(())
}

const FIELDS_2D: [&str; 18] = [
    "centre_of_mass",
    "max_voxel",
    "max_count",
    "n_voxels",
    "total_count",
    "sample_id",
    "steps",
    "box_size_px",
    "snapshot_offset",
    "centre_x",
    "centre_y",
    "centre_x_box",
    "centre_y_box",
    "status",
    "message",
    "best_image",
    "reflections_in_best_image",
    "best_region",
];

/// One 2D result: every field required but `sample_id`; nullable ones may be null.
fn result_2d(p: &mut Parser) -> Result<Wire2d> {
    let mut r = Wire2d {
        centre_of_mass: None,
        max_voxel: None,
        max_count: None,
        n_voxels: None,
        total_count: None,
        sample_id: None,
        steps: [0; 2],
        box_size_px: [0.0; 2],
        snapshot_offset: [0.0; 2],
        centre_x: None,
        centre_y: None,
        centre_x_box: None,
        centre_y_box: None,
        status: String::new(),
        message: String::new(),
        best_image: None,
        reflections_in_best_image: None,
        best_region: None,
    };
    let mut seen = 0u32;
    let mut key = p.object()?;
    while let Some(k) = key {
        let Some(bit) = FIELDS_2D.iter().position(|f| *f == k) else {
            p.skip().in_key(&k)?;
            key = p.object_next()?;
            continue;
        };
        if seen & (1 << bit) != 0 {
            return Err(duplicate(&k));
        }
        let float = |p: &mut Parser| nullable(p, |p| p.float());
        let int = |p: &mut Parser| nullable(p, |p| p.int());
        (|| -> Result<()> {
            match bit {
                0 => r.centre_of_mass = nullable(p, floats)?,
                1 => r.max_voxel = nullable(p, ints)?,
                2 => r.max_count = float(p)?,
                3 => r.n_voxels = int(p)?,
                4 => r.total_count = float(p)?,
                5 => r.sample_id = int(p)?,
                6 => r.steps = ints(p)?,
                7 => r.box_size_px = floats(p)?,
                8 => r.snapshot_offset = floats(p)?,
                9 => r.centre_x = float(p)?,
                10 => r.centre_y = float(p)?,
                11 => r.centre_x_box = float(p)?,
                12 => r.centre_y_box = float(p)?,
                13 => r.status = p.string()?.into_owned(),
                14 => r.message = p.string()?.into_owned(),
                15 => r.best_image = int(p)?,
                16 => r.reflections_in_best_image = int(p)?,
                _ => r.best_region = nullable(p, |p| list_of(p, ints))?,
            }
            Ok(())
        })()
        .in_key(&k)?;
        seen |= 1 << bit;
        key = p.object_next()?;
    }
    require(seen, ((1 << 18) - 1) & !(1 << 5), &FIELDS_2D)?;
    Ok(r)
}

// ---- writing -------------------------------------------------------------

/// Append `s` as a JSON string, escaped as Python's `json.dumps` does.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(out, "\\u{u:04x}").unwrap();
                }
            }
        }
    }
    out.push('"');
}

fn write_list<T>(out: &mut String, items: &[T], mut item: impl FnMut(&mut String, &T)) {
    out.push('[');
    for (i, x) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        item(out, x);
    }
    out.push(']');
}

fn write_int(out: &mut String, v: &i64) {
    write!(out, "{v}").unwrap();
}

fn write_f64(out: &mut String, v: &f64) {
    write_float(out, *v);
}

fn write_opt<T>(out: &mut String, v: &Option<T>, write: impl FnOnce(&mut String, &T)) {
    match v {
        Some(v) => write(out, v),
        None => out.push_str("null"),
    }
}

/// A list of 3D results, byte for byte as `json.dumps` writes their dicts.
pub fn write_results_3d(out: &mut String, rows: &[Xrc3d]) {
    write_list(out, rows, |out, r| {
        out.push_str("{\"centre_of_mass\": ");
        write_list(out, &r.centre_of_mass, write_f64);
        out.push_str(", \"max_voxel\": ");
        write_list(out, &r.max_voxel, write_int);
        out.push_str(", \"max_count\": ");
        write_float(out, r.max_count);
        write!(out, ", \"n_voxels\": {}, \"total_count\": ", r.n_voxels).unwrap();
        write_float(out, r.total_count);
        out.push_str(", \"sample_id\": ");
        write_opt(out, &r.sample_id, write_int);
        out.push_str(", \"bounding_box\": ");
        write_list(out, &r.bounding_box, |out, c| write_list(out, c, write_int));
        out.push('}');
    });
}

fn write_result_2d(out: &mut String, r: &Wire2d) {
    let f = |out: &mut String, name: &str, v: &Option<f64>| {
        write!(out, ", \"{name}\": ").unwrap();
        write_opt(out, v, write_f64);
    };
    let i = |out: &mut String, name: &str, v: &Option<i64>| {
        write!(out, ", \"{name}\": ").unwrap();
        write_opt(out, v, write_int);
    };
    out.push_str("{\"centre_of_mass\": ");
    write_opt(out, &r.centre_of_mass, |out, c| write_list(out, c, write_f64));
    out.push_str(", \"max_voxel\": ");
    write_opt(out, &r.max_voxel, |out, c| write_list(out, c, write_int));
    f(out, "max_count", &r.max_count);
    i(out, "n_voxels", &r.n_voxels);
    f(out, "total_count", &r.total_count);
    i(out, "sample_id", &r.sample_id);
    out.push_str(", \"steps\": ");
    write_list(out, &r.steps, write_int);
    out.push_str(", \"box_size_px\": ");
    write_list(out, &r.box_size_px, write_f64);
    out.push_str(", \"snapshot_offset\": ");
    write_list(out, &r.snapshot_offset, write_f64);
    f(out, "centre_x", &r.centre_x);
    f(out, "centre_y", &r.centre_y);
    f(out, "centre_x_box", &r.centre_x_box);
    f(out, "centre_y_box", &r.centre_y_box);
    out.push_str(", \"status\": ");
    write_str(out, &r.status);
    out.push_str(", \"message\": ");
    write_str(out, &r.message);
    i(out, "best_image", &r.best_image);
    i(out, "reflections_in_best_image", &r.reflections_in_best_image);
    out.push_str(", \"best_region\": ");
    write_opt(out, &r.best_region, |out, region| write_list(out, region, |out, c| write_list(out, c, write_int)));
    out.push('}');
}

/// `{"results": [...], "status": ..., "type": ...}`.
pub fn write_payload(out: &mut String, results: &Results, status: &str) {
    out.push_str("{\"results\": ");
    let kind = match results {
        Results::ThreeD(rows) => {
            write_results_3d(out, rows);
            "3d"
        }
        Results::TwoD(rows) => {
            write_list(out, rows, write_result_2d);
            "2d"
        }
    };
    out.push_str(", \"status\": ");
    write_str(out, status);
    write!(out, ", \"type\": \"{kind}\"}}").unwrap();
}

/// Who a results message is for, and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Addressee {
    pub dcid: i64,
    pub dcgid: Option<i64>,
    pub gpu: bool,
    /// Routing key `xrc.<beamline>` on the `results` exchange.
    pub beamline: String,
    pub environment_id: String,
}

/// A results message as the centring step sends it to `xrc.<beamline>`: a recipe
/// envelope with a one-step recipe whose parameters name the collection (DCIDs
/// as strings, as Zocalo writes them).
pub fn write_result_message(out: &mut String, results: &Results, status: &str, to: &Addressee) {
    out.push_str("{\"environment\": {\"ID\": ");
    write_str(out, &to.environment_id);
    out.push_str("}, \"payload\": ");
    write_payload(out, results, status);
    out.push_str(", \"recipe\": {\"start\": [[1, []]], \"1\": {\"service\": \"Send XRC results to GDA\", \"queue\": ");
    write_str(out, &format!("xrc.{}", to.beamline));
    write!(out, ", \"exchange\": \"results\", \"parameters\": {{\"dcid\": \"{}\"", to.dcid).unwrap();
    if let Some(dcgid) = to.dcgid {
        write!(out, ", \"dcgid\": \"{dcgid}\"").unwrap();
    }
    if to.gpu {
        out.push_str(", \"gpu\": true");
    }
    out.push_str("}}}, \"recipe-path\": [], \"recipe-pointer\": 1}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVELOPE: &str = r#"{"environment": {"ID": "6261b482-bef2-49f5-8699-eb274cd3b92e"},
      "payload": {"results": [{"centre_of_mass": [2.2071, 1.4175, 13.3172], "max_voxel": [2, 1, 13],
                   "max_count": 702.0, "n_voxels": 12, "total_count": 5832.0,
                   "bounding_box": [[1, 0, 12], [4, 3, 15]], "sample_id": 123456}],
                  "status": "success", "type": "3d"},
      "recipe": {"start": [[1, []]],
                 "1": {"service": "Send XRC results to GDA", "queue": "xrc.i03",
                       "exchange": "results", "parameters": {"dcid": "2", "dcgid": "4"}}},
      "recipe-path": [], "recipe-pointer": 1}"#;

    fn row() -> Xrc3d {
        Xrc3d {
            centre_of_mass: [2.2071, 1.4175, 13.3172],
            max_voxel: [2, 1, 13],
            max_count: 702.0,
            n_voxels: 12,
            total_count: 5832.0,
            sample_id: Some(123456),
            bounding_box: [[1, 0, 12], [4, 3, 15]],
        }
    }

    #[test]
    fn the_spec_envelope() {
        let m = parse_result_message(ENVELOPE.as_bytes()).unwrap();
        assert_eq!(m.results, Results::ThreeD(vec![row()]));
        assert_eq!((m.dcid, m.dcgid, m.gpu), (Some(2), Some(4), false));
        assert_eq!(m.status.as_deref(), Some("success"));
        assert_eq!(m.environment_id.as_deref(), Some("6261b482-bef2-49f5-8699-eb274cd3b92e"));
    }

    #[test]
    fn round_trip_through_the_writer() {
        let to = Addressee { dcid: 7, dcgid: Some(8), gpu: true, beamline: "i04".into(), environment_id: "e\u{e9}".into() };
        for results in [Results::ThreeD(vec![row(), row()]), Results::ThreeD(vec![])] {
            let mut s = String::new();
            write_result_message(&mut s, &results, "success", &to);
            let m = parse_result_message(s.as_bytes()).unwrap();
            assert_eq!(m.results, results);
            assert_eq!((m.dcid, m.dcgid, m.gpu, m.environment_id.as_deref()), (Some(7), Some(8), true, Some("e\u{e9}")));
            assert!(s.contains("\"ID\": \"e\\u00e9\""), "{s}");
        }
    }

    #[test]
    fn errors_carry_the_json_path() {
        let e = |body: &str| parse_result_message(body.as_bytes()).unwrap_err().to_string();
        let bad = ENVELOPE.replace("[[1, 0, 12], [4, 3, 15]]", "[[1, 0, 12], [4, 3]]");
        assert_eq!(e(&bad), "payload.results[0].bounding_box[1]: expected 3 integers, got 2");
        let bad = ENVELOPE.replace("\"n_voxels\": 12,", "");
        assert_eq!(e(&bad), "payload.results[0]: missing field 'n_voxels'");
        let bad = ENVELOPE.replace("\"dcid\": \"2\"", "\"dcid\": \"two\"");
        assert_eq!(e(&bad), "recipe.1.parameters.dcid: expected an integer or a string of digits, got \"two\"");
        let bad = ENVELOPE.replace("\"recipe-pointer\": 1", "\"recipe-pointer\": 3");
        assert_eq!(e(&bad), "recipe-pointer: the recipe has no step 3");
        let bad = ENVELOPE.replace("\"type\": \"3d\"", "\"type\": \"4d\"");
        assert_eq!(e(&bad), "payload.type: expected \"2d\" or \"3d\", got \"4d\"");
        assert!(e(&ENVELOPE[..200]).starts_with("payload.results[0]: truncated JSON"), "{}", e(&ENVELOPE[..200]));
        assert_eq!(e("[1]"), "[0]: expected an object, got a number");
        assert_eq!(e("\"x\""), "expected a recipe envelope, a result payload or a list of results, got a string");
    }

    #[test]
    fn bare_payloads_and_lists() {
        let m = parse_result_message(br#"{"type": "3d", "status": "success", "results": []}"#).unwrap();
        assert_eq!(m.results, Results::ThreeD(vec![]));
        assert_eq!(m.dcid, None);
        let mut list = String::new();
        write_results_3d(&mut list, &[row()]);
        let m = parse_result_message(list.as_bytes()).unwrap();
        assert_eq!((m.results, m.status), (Results::ThreeD(vec![row()]), None));
    }
}
