//! A generic XML element tree that keeps every element, attribute, comment and text node, so a
//! domain definition written back by `dumpxml` loses nothing the user wrote — including elements
//! rvirt does not understand.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use std::fmt::Write as _;

/// Where in the source text something is, 1-based, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

impl Position {
    /// Converts a byte offset into `text` into a line and column (columns count characters).
    pub fn at(text: &str, offset: usize) -> Position {
        let offset = offset.min(text.len());
        let before = &text.as_bytes()[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |p| p + 1);
        let column = String::from_utf8_lossy(&before[line_start..])
            .chars()
            .count()
            + 1;
        Position { line, column }
    }
}

/// Malformed XML, with the place it was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed XML at {position}: {message}")]
pub struct SyntaxError {
    pub position: Position,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
    CData(String),
    Comment(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
    /// Where the start tag was in the parsed text (default for elements built in code).
    pub position: Position,
}

impl Element {
    pub fn new(name: &str) -> Element {
        Element {
            name: name.to_string(),
            ..Default::default()
        }
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_attr(&mut self, name: &str, value: &str) {
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value.to_string(),
            None => self.attrs.push((name.to_string(), value.to_string())),
        }
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    pub fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.elements_mut().find(|e| e.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.elements().filter(move |e| e.name == name)
    }

    /// The child with this name, created (appended) when missing.
    pub fn child_or_insert(&mut self, name: &str) -> &mut Element {
        if self.child(name).is_none() {
            self.children.push(Node::Element(Element::new(name)));
        }
        self.child_mut(name).expect("just inserted")
    }

    /// Inserts `child` right after the first existing child named one of `after` (else first).
    pub fn insert_after(&mut self, after: &[&str], child: Element) {
        let idx = self
            .children
            .iter()
            .position(|n| matches!(n, Node::Element(e) if after.contains(&e.name.as_str())))
            .map_or(0, |i| i + 1);
        self.children.insert(idx, Node::Element(child));
    }

    pub fn remove_children(&mut self, name: &str) {
        self.children
            .retain(|n| !matches!(n, Node::Element(e) if e.name == name));
    }

    /// Concatenated text content (direct children only), trimmed.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) | Node::CData(t) = n {
                s.push_str(t);
            }
        }
        s.trim().to_string()
    }

    pub fn set_text(&mut self, text: &str) {
        self.children
            .retain(|n| !matches!(n, Node::Text(_) | Node::CData(_)));
        self.children.insert(0, Node::Text(text.to_string()));
    }

    pub fn with_text(mut self, text: &str) -> Element {
        self.set_text(text);
        self
    }

    pub fn with_attr(mut self, k: &str, v: &str) -> Element {
        self.set_attr(k, v);
        self
    }

    pub fn with_child(mut self, child: Element) -> Element {
        self.children.push(Node::Element(child));
        self
    }

    /// Parses one document; whitespace-only text between elements is dropped (it is layout, and
    /// the writer re-indents), all other text, comments and CDATA are kept.
    pub fn parse(text: &str) -> Result<Element, SyntaxError> {
        let mut reader = Reader::from_str(text);
        reader.config_mut().check_end_names = true;
        let mut stack: Vec<Element> = Vec::new();
        let mut root: Option<Element> = None;
        loop {
            let before = reader.buffer_position() as usize;
            let event = reader.read_event().map_err(|e| SyntaxError {
                position: Position::at(text, reader.error_position() as usize),
                message: e.to_string(),
            })?;
            let err = |message: String| SyntaxError {
                position: Position::at(text, before),
                message,
            };
            match event {
                Event::Start(start) => {
                    stack.push(start_element(&start, text, before).map_err(err)?);
                }
                Event::Empty(start) => {
                    let el = start_element(&start, text, before).map_err(err)?;
                    attach(&mut stack, &mut root, el).map_err(err)?;
                }
                Event::End(_) => {
                    let el = stack
                        .pop()
                        .ok_or_else(|| err("unexpected end tag".into()))?;
                    attach(&mut stack, &mut root, el).map_err(err)?;
                }
                Event::Text(t) => {
                    let s = t.unescape().map_err(|e| err(e.to_string()))?;
                    if !s.trim().is_empty() {
                        match stack.last_mut() {
                            Some(top) => top.children.push(Node::Text(s.into_owned())),
                            None => return Err(err("text outside the root element".into())),
                        }
                    }
                }
                Event::CData(t) => {
                    let s = String::from_utf8_lossy(&t).into_owned();
                    if let Some(top) = stack.last_mut() {
                        top.children.push(Node::CData(s));
                    }
                }
                Event::Comment(t) => {
                    let s = String::from_utf8_lossy(&t).into_owned();
                    if let Some(top) = stack.last_mut() {
                        top.children.push(Node::Comment(s));
                    }
                }
                Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
                Event::Eof => break,
            }
        }
        if let Some(open) = stack.last() {
            return Err(SyntaxError {
                position: Position::at(text, text.len()),
                message: format!("element <{}> is not closed", open.name),
            });
        }
        root.ok_or_else(|| SyntaxError {
            position: Position::at(text, text.len()),
            message: "the document has no root element".into(),
        })
    }

    /// Writes the tree indented by two spaces per level, as libvirt's dumpxml does.
    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, 0);
        out
    }

    fn write(&self, out: &mut String, depth: usize) {
        let indent = "  ".repeat(depth);
        let _ = write!(out, "{indent}<{}", self.name);
        for (k, v) in &self.attrs {
            // Single quotes, as libvirt writes its XML.
            let _ = write!(out, " {k}='{}'", escape_attr(v));
        }
        if self.children.is_empty() {
            out.push_str("/>\n");
            return;
        }
        let mixed = self
            .children
            .iter()
            .any(|n| matches!(n, Node::Text(_) | Node::CData(_)));
        if mixed {
            out.push('>');
            for n in &self.children {
                match n {
                    Node::Text(t) => out.push_str(&escape_text(t)),
                    Node::CData(t) => {
                        let _ = write!(out, "<![CDATA[{t}]]>");
                    }
                    Node::Comment(t) => {
                        let _ = write!(out, "<!--{t}-->");
                    }
                    Node::Element(e) => {
                        let mut inner = String::new();
                        e.write(&mut inner, 0);
                        out.push_str(inner.trim_end());
                    }
                }
            }
            let _ = writeln!(out, "</{}>", self.name);
            return;
        }
        out.push_str(">\n");
        for n in &self.children {
            match n {
                Node::Element(e) => e.write(out, depth + 1),
                Node::Comment(t) => {
                    let _ = writeln!(out, "{indent}  <!--{t}-->");
                }
                Node::Text(_) | Node::CData(_) => unreachable!("handled as mixed content"),
            }
        }
        let _ = writeln!(out, "{indent}</{}>", self.name);
    }
}

fn start_element(start: &BytesStart, text: &str, offset: usize) -> Result<Element, String> {
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut el = Element {
        name,
        position: Position::at(text, offset),
        ..Default::default()
    };
    for attr in start.attributes() {
        let attr = attr.map_err(|e| format!("bad attribute in <{}>: {e}", el.name))?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        let value = attr
            .unescape_value()
            .map_err(|e| format!("bad value of attribute {key} in <{}>: {e}", el.name))?
            .into_owned();
        if el.attr(&key).is_some() {
            return Err(format!("attribute {key} repeated in <{}>", el.name));
        }
        el.attrs.push((key, value));
    }
    Ok(el)
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, el: Element) -> Result<(), String> {
    match stack.last_mut() {
        Some(parent) => parent.children.push(Node::Element(el)),
        None if root.is_none() => *root = Some(el),
        None => return Err(format!("a second root element <{}>", el.name)),
    }
    Ok(())
}

fn escape_text(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn escape_attr(s: &str) -> String {
    escape_text(s).replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let t = "ab\ncd\nef";
        assert_eq!(Position::at(t, 0), Position { line: 1, column: 1 });
        assert_eq!(Position::at(t, 4), Position { line: 2, column: 2 });
    }

    #[test]
    fn round_trip_keeps_text_attrs_comments() {
        let src = "<a x=\"1 &amp; 2 'q'\"><!-- keep --><b>t&lt;</b><c/><d>mixed <e/> text</d></a>";
        let tree = Element::parse(src).unwrap();
        let again = Element::parse(&tree.to_xml()).unwrap();
        assert_eq!(strip_pos(tree.clone()), strip_pos(again));
        assert_eq!(tree.attr("x"), Some("1 & 2 'q'"));
        assert_eq!(tree.child("b").unwrap().text(), "t<");
    }

    #[test]
    fn malformed_xml_reports_line_and_column() {
        let err = Element::parse("<domain>\n  <name>x</nam>\n</domain>").unwrap_err();
        assert_eq!(err.position.line, 2, "{err}");
        let err = Element::parse("<domain>\n  <name>x</name>\n").unwrap_err();
        assert!(err.message.contains("not closed"), "{err}");
        let err = Element::parse("<a b='1' b='2'/>").unwrap_err();
        assert!(err.message.contains("duplicated"), "{err}");
    }

    pub(crate) fn strip_pos(mut e: Element) -> Element {
        e.position = Position::default();
        e.children = e
            .children
            .into_iter()
            .map(|n| match n {
                Node::Element(c) => Node::Element(strip_pos(c)),
                Node::Text(t) => Node::Text(t.trim().to_string()),
                other => other,
            })
            .collect();
        e
    }
}
