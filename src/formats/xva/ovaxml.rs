//! `ova.xml`: the export's description, an XML-RPC `<value><struct>` with `version` and
//! `objects` (xapi `ocaml/xapi/export.ml` and `import.ml`; the layout is the one XenServer 5.5
//! to 8 writes, see FORMAT-NOTES).
//!
//! The XML reader handles the subset XML-RPC uses: elements without meaningful attributes,
//! text with the five predefined entities and character references, CDATA, comments and the
//! `<?xml?>` declaration. A DOCTYPE is refused (real exports have none, and no entity is ever
//! expanded). Nesting is bounded. The old pre-tar layout's `<appliance>` root is recognised and
//! refused by the caller.

/// An XML-RPC value. Scalars keep their text (`<int>`, `<boolean>`, … are not needed as types).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Scalar(String),
    Struct(Vec<(String, Value)>),
    Array(Vec<Value>),
}

impl Value {
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Struct(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn str(&self, key: &str) -> Option<&str> {
        match self.get(key)? {
            Value::Scalar(s) => Some(s),
            _ => None,
        }
    }
    pub fn array(&self, key: &str) -> &[Value] {
        match self.get(key) {
            Some(Value::Array(a)) => a,
            _ => &[],
        }
    }
}

const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Open(String),
    Close(String),
    Empty(String),
    Text(String),
}

/// Splits XML text into tags and (decoded) text.
fn tokenize(s: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() {
        if b[i] != b'<' {
            let end = s[i..].find('<').map_or(s.len(), |j| i + j);
            out.push(Tok::Text(decode(&s[i..end])?));
            i = end;
            continue;
        }
        let rest = &s[i..];
        let skip = |end: &str, what: &str| rest.find(end).map(|j| j + end.len()).ok_or(format!("unterminated {what}"));
        if rest.starts_with("<?") {
            i += skip("?>", "declaration")?;
        } else if rest.starts_with("<!--") {
            i += skip("-->", "comment")?;
        } else if let Some(c) = rest.strip_prefix("<![CDATA[") {
            let j = c.find("]]>").ok_or("unterminated CDATA")?;
            out.push(Tok::Text(c[..j].to_string()));
            i += 9 + j + 3;
        } else if rest.starts_with("<!") {
            return Err("a DOCTYPE or other declaration is not expected in ova.xml".into());
        } else {
            let j = rest.find('>').ok_or("unterminated tag")?;
            let inner = &rest[1..j];
            let (close, inner) = match inner.strip_prefix('/') {
                Some(x) => (true, x),
                None => (false, inner),
            };
            let (empty, inner) = match inner.strip_suffix('/') {
                Some(x) => (true, x),
                None => (false, inner),
            };
            let name = inner.split_whitespace().next().unwrap_or("").to_string();
            if name.is_empty() || (close && empty) {
                return Err(format!("malformed tag <{}>", &rest[1..j]));
            }
            out.push(if close {
                Tok::Close(name)
            } else if empty {
                Tok::Empty(name)
            } else {
                Tok::Open(name)
            });
            i += j + 1;
        }
    }
    Ok(out)
}

fn decode(t: &str) -> Result<String, String> {
    if !t.contains('&') {
        return Ok(t.to_string());
    }
    let mut out = String::with_capacity(t.len());
    let mut rest = t;
    while let Some(a) = rest.find('&') {
        out.push_str(&rest[..a]);
        let e = rest[a..].find(';').ok_or("unterminated entity")? + a;
        let ent = &rest[a + 1..e];
        let c = match ent {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let n = if let Some(h) = ent.strip_prefix("#x").or(ent.strip_prefix("#X")) {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = ent.strip_prefix('#') {
                    d.parse().ok()
                } else {
                    None
                };
                n.and_then(char::from_u32).ok_or(format!("unknown entity &{ent};"))?
            }
        };
        out.push(c);
        rest = &rest[e + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

impl Parser {
    /// Skips whitespace-only text.
    fn next(&mut self) -> Option<Tok> {
        while let Some(t) = self.toks.get(self.pos) {
            self.pos += 1;
            match t {
                Tok::Text(s) if s.trim().is_empty() => continue,
                t => return Some(t.clone()),
            }
        }
        None
    }

    fn expect_close(&mut self, name: &str) -> Result<(), String> {
        match self.next() {
            Some(Tok::Close(n)) if n == name => Ok(()),
            other => Err(format!("expected </{name}>, found {}", show(&other))),
        }
    }

    /// Text up to `</name>` (possibly empty).
    fn text_until(&mut self, name: &str) -> Result<String, String> {
        let mut s = String::new();
        loop {
            match self.toks.get(self.pos).cloned() {
                Some(Tok::Text(t)) => {
                    s.push_str(&t);
                    self.pos += 1;
                }
                Some(Tok::Close(n)) if n == name => {
                    self.pos += 1;
                    return Ok(s);
                }
                other => return Err(format!("expected text and </{name}>, found {}", show(&other))),
            }
        }
    }

    /// After `<value>` has been consumed.
    fn value_body(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err("values nested too deeply".into());
        }
        // Bare text means a string.
        let start = self.pos;
        let mut text = String::new();
        while let Some(Tok::Text(t)) = self.toks.get(self.pos) {
            text.push_str(t);
            self.pos += 1;
        }
        if let Some(Tok::Close(n)) = self.toks.get(self.pos)
            && n == "value"
        {
            self.pos += 1;
            return Ok(Value::Scalar(text));
        }
        if !text.trim().is_empty() {
            return Err(format!("unexpected text {:?} inside <value>", text.trim()));
        }
        self.pos = start;
        let v = match self.next() {
            Some(Tok::Empty(t)) => match t.as_str() {
                "struct" => Value::Struct(Vec::new()),
                "array" => Value::Array(Vec::new()),
                _ => Value::Scalar(String::new()),
            },
            Some(Tok::Open(t)) => match t.as_str() {
                "struct" => self.struct_body(depth)?,
                "array" => self.array_body(depth)?,
                "string" | "int" | "i4" | "i8" | "boolean" | "double" | "dateTime.iso8601" | "base64" => {
                    Value::Scalar(self.text_until(&t)?)
                }
                _ => return Err(format!("unexpected <{t}> inside <value>")),
            },
            other => return Err(format!("expected a value, found {}", show(&other))),
        };
        self.expect_close("value")?;
        Ok(v)
    }

    fn value(&mut self, depth: usize) -> Result<Value, String> {
        match self.next() {
            Some(Tok::Open(t)) if t == "value" => self.value_body(depth + 1),
            Some(Tok::Empty(t)) if t == "value" => Ok(Value::Scalar(String::new())),
            other => Err(format!("expected <value>, found {}", show(&other))),
        }
    }

    fn struct_body(&mut self, depth: usize) -> Result<Value, String> {
        let mut m = Vec::new();
        loop {
            match self.next() {
                Some(Tok::Close(t)) if t == "struct" => return Ok(Value::Struct(m)),
                Some(Tok::Open(t)) if t == "member" => {
                    let name = match self.next() {
                        Some(Tok::Open(n)) if n == "name" => self.text_until("name")?,
                        Some(Tok::Empty(n)) if n == "name" => String::new(),
                        other => return Err(format!("expected <name> in <member>, found {}", show(&other))),
                    };
                    let v = self.value(depth)?;
                    self.expect_close("member")?;
                    m.push((name, v));
                }
                other => return Err(format!("expected <member> or </struct>, found {}", show(&other))),
            }
        }
    }

    fn array_body(&mut self, depth: usize) -> Result<Value, String> {
        let mut a = Vec::new();
        match self.next() {
            Some(Tok::Empty(t)) if t == "data" => {}
            Some(Tok::Open(t)) if t == "data" => loop {
                match self.toks.get(self.pos) {
                    Some(Tok::Close(t)) if t == "data" => {
                        self.pos += 1;
                        break;
                    }
                    Some(Tok::Text(s)) if s.trim().is_empty() => self.pos += 1,
                    _ => a.push(self.value(depth)?),
                }
            },
            other => return Err(format!("expected <data> in <array>, found {}", show(&other))),
        }
        self.expect_close("array")?;
        Ok(Value::Array(a))
    }
}

fn show(t: &Option<Tok>) -> String {
    match t {
        None => "the end of the document".into(),
        Some(Tok::Open(n)) => format!("<{n}>"),
        Some(Tok::Close(n)) => format!("</{n}>"),
        Some(Tok::Empty(n)) => format!("<{n}/>"),
        Some(Tok::Text(s)) => format!("text {:?}", s.chars().take(40).collect::<String>()),
    }
}

/// The root element's name (to recognise the old `<appliance>` layout).
pub fn root_element(xml: &str) -> Option<String> {
    tokenize(xml).ok()?.into_iter().find_map(|t| match t {
        Tok::Open(n) | Tok::Empty(n) => Some(n),
        _ => None,
    })
}

/// Parses the whole document as one XML-RPC `<value>`.
pub fn parse_value(xml: &str) -> Result<Value, String> {
    let mut p = Parser { toks: tokenize(xml)?, pos: 0 };
    let v = p.value(0)?;
    match p.next() {
        None => Ok(v),
        Some(t) => Err(format!("unexpected {} after the top-level value", show(&Some(t)))),
    }
}

/// What vdiskfs needs from ova.xml.
#[derive(Debug, Clone, Default)]
pub struct Export {
    /// `version` fields in document order (hostname, date, product_version, …).
    pub version: Vec<(String, String)>,
    pub export_vsn: u32,
    pub vms: Vec<Vm>,
    pub vdis: Vec<Vdi>,
    pub vbds: Vec<Vbd>,
}

#[derive(Debug, Clone, Default)]
pub struct Vm {
    pub id: String,
    pub uuid: String,
    pub name_label: String,
    pub is_a_snapshot: bool,
    pub is_a_template: bool,
    pub suspend_vdi: String,
}

#[derive(Debug, Clone, Default)]
pub struct Vdi {
    pub id: String,
    pub uuid: String,
    pub name_label: String,
    pub virtual_size: u64,
    pub ty: String,
}

#[derive(Debug, Clone, Default)]
pub struct Vbd {
    pub id: String,
    pub vm: String,
    pub vdi: String,
    /// `Disk` or `CD`.
    pub ty: String,
    pub empty: bool,
    pub userdevice: String,
}

fn truthy(s: Option<&str>) -> bool {
    matches!(s.map(str::trim), Some("1" | "true"))
}

impl Export {
    pub fn parse(xml: &str) -> Result<Export, String> {
        let root = parse_value(xml)?;
        let Value::Struct(_) = root else {
            return Err("the top-level value is not a struct".into());
        };
        let mut ex = Export::default();
        if let Some(Value::Struct(v)) = root.get("version") {
            for (k, val) in v {
                if let Value::Scalar(s) = val {
                    ex.version.push((k.clone(), s.clone()));
                }
            }
        }
        ex.export_vsn = match ex.version.iter().find(|(k, _)| k == "export_vsn") {
            None => 0,
            Some((_, v)) => v.trim().parse().map_err(|_| format!("version.export_vsn {v:?} is not a number"))?,
        };
        let Some(Value::Array(objects)) = root.get("objects") else {
            return Err("no 'objects' array in the top-level struct".into());
        };
        for o in objects {
            let (Some(class), Some(id)) = (o.str("class"), o.str("id")) else {
                return Err("an object without 'class' or 'id'".into());
            };
            let Some(snap @ Value::Struct(_)) = o.get("snapshot") else {
                return Err(format!("object {id} ({class}) has no 'snapshot' struct"));
            };
            let s = |k: &str| snap.str(k).unwrap_or("").to_string();
            match class {
                "VM" => ex.vms.push(Vm {
                    id: id.into(),
                    uuid: s("uuid"),
                    name_label: s("name_label"),
                    is_a_snapshot: truthy(snap.str("is_a_snapshot")),
                    is_a_template: truthy(snap.str("is_a_template")),
                    suspend_vdi: s("suspend_VDI"),
                }),
                "VDI" => {
                    let vs = snap.str("virtual_size").ok_or(format!("VDI {id} has no virtual_size"))?;
                    let virtual_size =
                        vs.trim().parse().map_err(|_| format!("VDI {id} has virtual_size {vs:?}, not a byte count"))?;
                    ex.vdis.push(Vdi {
                        id: id.into(),
                        uuid: s("uuid"),
                        name_label: s("name_label"),
                        virtual_size,
                        ty: s("type"),
                    })
                }
                "VBD" => ex.vbds.push(Vbd {
                    id: id.into(),
                    vm: s("VM"),
                    vdi: s("VDI"),
                    ty: s("type"),
                    empty: truthy(snap.str("empty")),
                    userdevice: s("userdevice"),
                }),
                _ => {}
            }
        }
        Ok(ex)
    }

    /// The exported VM: the first that is neither a snapshot nor a template, else the first.
    pub fn vm(&self) -> Option<&Vm> {
        self.vms.iter().find(|v| !v.is_a_snapshot && !v.is_a_template).or(self.vms.first())
    }

    pub fn get_version(&self, k: &str) -> Option<&str> {
        self.version.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    /// The non-empty VBDs that use VDI `id`.
    pub fn vbds_of<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a Vbd> + 'a {
        self.vbds.iter().filter(move |b| b.vdi == id && !b.empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trimmed XenServer 7.1-style ova.xml: one VM, a disk VBD and an empty CD VBD.
    const OVA: &str = r#"<?xml version="1.0"?>
<value><struct>
  <member><name>version</name><value><struct>
    <member><name>hostname</name><value>xs71</value></member>
    <member><name>product_version</name><value>7.1.0</value></member>
    <member><name>export_vsn</name><value>2</value></member>
  </struct></value></member>
  <member><name>objects</name><value><array><data>
    <value><struct>
      <member><name>class</name><value>VM</value></member>
      <member><name>id</name><value>Ref:0</value></member>
      <member><name>snapshot</name><value><struct>
        <member><name>name_label</name><value>web &amp; db</value></member>
        <member><name>is_a_template</name><value><boolean>0</boolean></value></member>
        <member><name>suspend_VDI</name><value>OpaqueRef:NULL</value></member>
        <member><name>VBDs</name><value><array><data><value>Ref:3</value></data></array></value></member>
        <member><name>recommendations</name><value>&lt;restrictions/&gt;</value></member>
        <member><name>name_description</name><value/></member>
      </struct></value></member>
    </struct></value>
    <value><struct>
      <member><name>class</name><value>VBD</value></member>
      <member><name>id</name><value>Ref:3</value></member>
      <member><name>snapshot</name><value><struct>
        <member><name>VM</name><value>Ref:0</value></member>
        <member><name>VDI</name><value>Ref:4</value></member>
        <member><name>userdevice</name><value>0</value></member>
        <member><name>type</name><value>Disk</value></member>
        <member><name>empty</name><value><boolean>0</boolean></value></member>
      </struct></value></member>
    </struct></value>
    <value><struct>
      <member><name>class</name><value>VDI</value></member>
      <member><name>id</name><value>Ref:4</value></member>
      <member><name>snapshot</name><value><struct>
        <member><name>uuid</name><value>ebe16ffc-7f5d-4761-9cfe-2f052577d64d</value></member>
        <member><name>name_label</name><value>0</value></member>
        <member><name>virtual_size</name><value>5368709120</value></member>
        <member><name>type</name><value>system</value></member>
        <member><name>sm_config</name><value><struct/></value></member>
      </struct></value></member>
    </struct></value>
  </data></array></value></member>
</struct></value>"#;

    #[test]
    fn xenserver_ova_xml_gives_vm_vdi_and_vbd() {
        let ex = Export::parse(OVA).unwrap();
        assert_eq!(ex.export_vsn, 2);
        assert_eq!(ex.get_version("product_version"), Some("7.1.0"));
        assert_eq!(ex.vm().unwrap().name_label, "web & db");
        assert_eq!(ex.vdis.len(), 1);
        assert_eq!(ex.vdis[0].virtual_size, 5 << 30);
        assert_eq!(ex.vdis[0].id, "Ref:4");
        let b: Vec<_> = ex.vbds_of("Ref:4").collect();
        assert_eq!((b[0].ty.as_str(), b[0].userdevice.as_str()), ("Disk", "0"));
    }

    #[test]
    fn malformed_documents_say_what_is_wrong() {
        assert!(
            Export::parse("<value><struct><member><name>x</name></struct></value>")
                .unwrap_err()
                .contains("expected <value>")
        );
        assert!(Export::parse("<value><struct></struct></value>").unwrap_err().contains("objects"));
        assert!(parse_value("<value>a &bogus; b</value>").unwrap_err().contains("entity"));
        assert!(parse_value("<!DOCTYPE x [<!ENTITY a 'b'>]><value/>").is_err());
        let bad = OVA.replace("5368709120", "5 GiB");
        assert!(Export::parse(&bad).unwrap_err().contains("virtual_size \"5 GiB\""));
        let deep = "<value><array><data>".repeat(100);
        assert!(parse_value(&deep).unwrap_err().contains("deeply"));
    }

    #[test]
    fn entities_and_cdata_decode() {
        assert_eq!(
            parse_value("<value>&#65;&#x42;&lt;<![CDATA[<c>]]></value>").unwrap(),
            Value::Scalar("AB<<c>".into())
        );
        assert_eq!(root_element("<?xml version='1.0'?><appliance version=\"0.1\">"), Some("appliance".into()));
    }
}
