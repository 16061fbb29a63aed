//! SQL literals for LanceDB (DataFusion) filter strings.

/// A single-quoted SQL string literal: quotes are doubled, so no value can
/// end the literal and add SQL of its own.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `column IN ('a', 'b')` with every value quoted; `FALSE` for no values.
pub fn in_list(column: &str, values: &[impl AsRef<str>]) -> String {
    if values.is_empty() {
        return "FALSE".into();
    }
    let list: Vec<String> = values.iter().map(|v| quote(v.as_ref())).collect();
    format!("{column} IN ({})", list.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled() {
        assert_eq!(quote("x' OR '1'='1"), "'x'' OR ''1''=''1'");
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(in_list("doc_id", &["a", "b'c"]), "doc_id IN ('a', 'b''c')");
        assert_eq!(in_list("doc_id", &[] as &[&str]), "FALSE");
    }
}
