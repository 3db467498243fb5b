//! virsh's table layout: every cell is padded with one space before and two after, columns are
//! as wide as their widest cell, the last column is not padded, and the dashed rule under the
//! header is as long as all column widths together.

pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let cell_width = |s: &str| s.chars().count() + 3;
        let mut widths: Vec<usize> = self.header.iter().map(|h| cell_width(h)).collect();
        for r in &self.rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(cell_width(c));
            }
        }
        let line = |cells: &[String]| {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                s.push(' ');
                s.push_str(c);
                if i + 1 < n {
                    s.push_str(&" ".repeat(widths[i] - cell_width(c)));
                    s.push_str("  ");
                }
            }
            s.push('\n');
            s
        };
        let mut out = line(&self.header);
        out.push_str(&"-".repeat(widths.iter().sum()));
        out.push('\n');
        for r in &self.rows {
            out.push_str(&line(r));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_virsh_list_layout() {
        let mut t = Table::new(&["Id", "Name", "State"]);
        t.row(vec!["1".into(), "fedora".into(), "running".into()]);
        t.row(vec!["-".into(), "vm2".into(), "shut off".into()]);
        let expected = " Id   Name     State\n\
                        -------------------------\n \
                        1    fedora   running\n \
                        -    vm2      shut off\n";
        assert_eq!(t.render(), expected);
    }
}
