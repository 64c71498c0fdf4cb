//! How messages spell things: a count with its noun, and a word (a path,
//! an image name) as a command line the user can paste.

/// `noun`, with an `s` unless there is one.
pub fn plural(n: impl Into<u64>, noun: &str) -> String {
    if n.into() == 1 {
        noun.to_string()
    } else {
        format!("{noun}s")
    }
}

/// `word` as the shell reads it back: as it is when that is safe, else in
/// single quotes.
pub fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:@=+,%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_are_quoted_only_when_needed() {
        assert_eq!(shell_word("oci:/a/b:v1"), "oci:/a/b:v1");
        assert_eq!(shell_word("my dir"), "'my dir'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn one_is_singular() {
        assert_eq!(plural(1u64, "layer"), "layer");
        assert_eq!(plural(0u64, "layer"), "layers");
        assert_eq!(plural(2u64, "store path"), "store paths");
    }
}
