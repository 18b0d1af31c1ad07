//! Writing floats and JSON exactly as Python's `repr` / `json.dumps` do, so that
//! what the core writes is byte-for-byte what Diamond's Python service writes.

use std::fmt::Write;

/// Append `v` as Python's `repr(float)` spells it (`5832.0`, `1e-05`, `1e+16`).
/// `v` must be finite: JSON has no spelling for NaN or infinity.
pub fn write_float(out: &mut String, v: f64) {
    debug_assert!(v.is_finite());
    if v == 0.0 {
        out.push_str(if v.is_sign_negative() { "-0.0" } else { "0.0" });
        return;
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, as Python's repr does.
    let mut sci = String::with_capacity(32);
    write!(sci, "{:e}", v.abs()).unwrap();
    let (mantissa, exp) = sci.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if v < 0.0 {
        out.push('-');
    }
    let decpt = exp + 1; // value = 0.<digits> * 10^decpt
    if !(-4 < decpt && decpt <= 16) {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs()).unwrap();
    } else if decpt <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-decpt) as usize));
        out.push_str(&digits);
    } else if decpt as usize >= digits.len() {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', decpt as usize - digits.len()));
        out.push_str(".0");
    } else {
        out.push_str(&digits[..decpt as usize]);
        out.push('.');
        out.push_str(&digits[decpt as usize..]);
    }
}

/// `repr(float)` as a new string.
pub fn float_repr(v: f64) -> String {
    let mut s = String::new();
    write_float(&mut s, v);
    s
}

#[cfg(test)]
mod tests {
    use super::float_repr;

    #[test]
    fn matches_python_repr() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (5832.0, "5832.0"),
            (4.858891830104681, "4.858891830104681"),
            (0.5, "0.5"),
            (1e-4, "0.0001"),
            (1.5e-5, "1.5e-05"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.2345e16, "1.2345e+16"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (-2.5e-300, "-2.5e-300"),
            (45.45454545454545, "45.45454545454545"),
            (0.1 + 0.2, "0.30000000000000004"),
            (1e300, "1e+300"),
            (5e-324, "5e-324"),
        ];
        for &(v, want) in cases {
            assert_eq!(float_repr(v), want, "{v:e}");
        }
    }
}
