//! The one error type of the core: bad input, described in words a user can act on.

use std::fmt;

/// Input the centring core cannot work with. The message names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError(pub String);

impl InputError {
    pub fn new(message: impl Into<String>) -> Self {
        InputError(message.into())
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

pub type Result<T> = std::result::Result<T, InputError>;

/// How many characters of a bad value an error message quotes at most.
pub const QUOTED_CHARS: usize = 40;

/// A bad value as an error message quotes it: whole when short, else its
/// beginning and its length, so that a huge input never makes a huge message.
pub fn excerpt(text: &str) -> String {
    let n = text.chars().count();
    if n <= QUOTED_CHARS {
        return text.to_owned();
    }
    let head: String = text.chars().take(QUOTED_CHARS - 8).collect();
    format!("{head}... ({n} characters)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpts_are_bounded() {
        assert_eq!(excerpt("12345"), "12345");
        let long = "9".repeat(1_000_000);
        let e = excerpt(&long);
        assert!(e.len() < 80, "{e}");
        assert!(e.ends_with("(1000000 characters)"));
        assert_eq!(excerpt(&"é".repeat(50)).chars().filter(|&c| c == 'é').count(), QUOTED_CHARS - 8);
    }
}
