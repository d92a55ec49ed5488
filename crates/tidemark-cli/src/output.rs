//! Human output: aligned tables for lists, `key: value` lines for single objects.

use std::io::{self, Write};

use serde_json::Value;

/// A table with a header row, printed with columns padded to their widest cell.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&'static str]) -> Table {
        Table { header: header.to_vec(), rows: Vec::new() }
    }

    /// Add a row (missing cells print empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text; the last column is not padded.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                if i + 1 == columns {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.push_str(&" ".repeat(width - cell.chars().count() + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Print the table to stdout.
    pub fn print(&self) -> io::Result<()> {
        io::stdout().write_all(self.render().as_bytes())
    }
}

/// `key: value` lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.chars().count()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        out.push_str(&format!("{key}:{}{value}\n", " ".repeat(width - key.chars().count() + 1)));
    }
    out
}

/// Print JSON as the API sent it, pretty.
pub fn print_json(value: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    println!("{text}");
    Ok(())
}

/// A string field, or empty.
pub fn text(value: &Value, key: &str) -> String {
    match value.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A number field, or 0.
pub fn number(value: &Value, key: &str) -> u64 {
    value.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// An array field's items, or none.
pub fn items<'a>(value: &'a Value, key: &str) -> &'a [Value] {
    value.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// A list response's items (the API answers lists with a JSON array).
pub fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A point (`{seq, time}`) as `seq:N (TIME)`.
pub fn point(value: &Value) -> String {
    match (value.get("seq").and_then(Value::as_u64), value.get("time").and_then(Value::as_str)) {
        (Some(seq), Some(time)) => format!("seq:{seq} ({time})"),
        (Some(seq), None) => format!("seq:{seq}"),
        _ => String::new(),
    }
}

/// Seconds as `1day 2h`.
pub fn seconds(value: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(value)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let mut table = Table::new(&["NAME", "SIZE", "GROUP"]);
        table.row(vec!["db-data".into(), "10 GiB".into(), "db".into()]);
        table.row(vec!["x".into(), "1 MiB".into(), "web".into()]);
        assert_eq!(table.render(), "NAME     SIZE    GROUP\ndb-data  10 GiB  db\nx        1 MiB   web\n");
    }

    #[test]
    fn key_values_align() {
        let text = key_values(&[("name", "db".into()), ("last seq", "7".into())]);
        assert_eq!(text, "name:     db\nlast seq: 7\n");
    }

    #[test]
    fn points_and_fields_render() {
        let v = serde_json::json!({"seq": 4, "time": "2024-01-01T00:00:00Z", "n": null});
        assert_eq!(point(&v), "seq:4 (2024-01-01T00:00:00Z)");
        assert_eq!(text(&v, "n"), "");
        assert_eq!(text(&v, "seq"), "4");
        assert_eq!(number(&v, "seq"), 4);
        assert_eq!(seconds(86_400), "1day");
    }
}
