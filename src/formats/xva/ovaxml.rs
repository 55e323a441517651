//! `ova.xml`: the export's description, an XML-RPC `<value><struct>` with `version` and
//! `objects` (xapi `ocaml/xapi/export.ml` and `import.ml`; the layout is the one XenServer 5.5
//! to 8 writes, see FORMAT-NOTES).
//!
//! XML is parsed by `roxmltree` (a well-formedness-checking DOM parser; the text is at most
//! `MAX_OVA_XML` = 64 MiB, so a DOM is fine), then read as XML-RPC by the walk below. Against
//! hostile input: a DOCTYPE is refused (`allow_dtd: false`, roxmltree's default; real exports
//! have none), so no entity other than the five predefined ones and character references is
//! ever expanded (roxmltree would also cap entity nesting at 10 and refuse reference loops);
//! roxmltree builds the tree without recursion, so deep nesting cannot overflow its stack, and
//! the walk here, which does recurse, stops at [`MAX_DEPTH`] nested values. [`MAX_NODES`]
//! bounds the tree's memory: 64 MiB of `<a/>` costs 650 MB (the hand-written tokenizer this
//! replaced took 1.1 GB for it), a realistic 60 MiB document 760 MB (930 MB). Attributes, comments and processing instructions are ignored.
//! The old pre-tar layout's `<appliance>` root is reported as [`OvaXmlError::Appliance`].

use roxmltree::Node;

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

/// Bound on nested values (real exports nest about 6 deep); the tree walk below recurses.
const MAX_DEPTH: usize = 64;

/// Bound on XML nodes (about 100 bytes of memory each): one per 8 bytes of the largest ova.xml
/// read. Real exports have one per 9 bytes or more (`<member><name>x</name><value>y</value>
/// </member>` is 5 nodes), so only a hostile document such as 64 MiB of `<a/>` reaches it.
const MAX_NODES: u32 = (super::MAX_OVA_XML / 8) as u32;

/// Why ova.xml was not understood.
#[derive(Debug, thiserror::Error)]
pub enum OvaXmlError {
    /// The `<appliance>` root of the old pre-tar XVA layout.
    #[error("an <appliance> document (the old pre-tar XVA layout)")]
    Appliance,
    #[error("more than {MAX_NODES} XML nodes")]
    TooManyNodes,
    #[error(transparent)]
    Xml(roxmltree::Error),
    #[error("expected <value> as the root element, found <{0}>")]
    Root(String),
    /// `text` is the stray text, trimmed; `inside` the element's name.
    #[error("unexpected text {text:?} inside <{inside}>")]
    Text { text: String, inside: String },
    #[error("values nested too deeply")]
    TooDeep,
    /// `found` and `after` are shown as `<tag>`.
    #[error("unexpected {found} after {after} inside <value>")]
    Extra { found: String, after: String },
    /// `found` is shown as `<tag>`, or `nothing`.
    #[error("expected <{want}> in <{inside}>, found {found}")]
    Expected { want: &'static str, inside: &'static str, found: String },
    #[error("expected <value> after <name> in <member>, found {found}")]
    NoValue { found: String },
    #[error("an element inside <name>")]
    ElementInName,
    #[error("expected text in <{tag}>, found {found}")]
    NotText { tag: String, found: String },
    #[error("unexpected <{0}> inside <value>")]
    UnknownType(String),
    #[error("the top-level value is not a struct")]
    NotStruct,
    #[error("version.export_vsn {0:?} is not a number")]
    ExportVsn(String),
    #[error("no 'objects' array in the top-level struct")]
    NoObjects,
    #[error("an object without 'class' or 'id'")]
    NoClassOrId,
    #[error("object {id} ({class}) has no 'snapshot' struct")]
    NoSnapshot { id: String, class: String },
    #[error("VDI {0} has no virtual_size")]
    NoVirtualSize(String),
    #[error("VDI {id} has virtual_size {found:?}, not a byte count")]
    VirtualSize { id: String, found: String },
}

type Parsed<T> = Result<T, OvaXmlError>;

/// Parses the whole document as one XML-RPC `<value>`.
pub fn parse_value(xml: &str) -> Parsed<Value> {
    let opt = roxmltree::ParsingOptions { allow_dtd: false, nodes_limit: MAX_NODES, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(xml, opt).map_err(|e| match e {
        roxmltree::Error::NodesLimitReached => OvaXmlError::TooManyNodes,
        e => OvaXmlError::Xml(e),
    })?;
    let root = doc.root_element();
    match root.tag_name().name() {
        "value" => value(root, 1),
        "appliance" => Err(OvaXmlError::Appliance),
        t => Err(OvaXmlError::Root(t.to_string())),
    }
}

/// The text directly inside `n` (CDATA included, entities decoded by roxmltree).
fn text(n: Node) -> String {
    n.children().filter(|c| c.is_text()).filter_map(|c| c.text()).collect()
}

/// Refuses text other than whitespace directly inside `n`.
fn no_text(n: Node) -> Parsed<()> {
    let t = text(n);
    if !t.trim().is_empty() {
        return Err(OvaXmlError::Text { text: t.trim().to_string(), inside: n.tag_name().name().to_string() });
    }
    Ok(())
}

/// The element children of `n`; text other than whitespace between them is an error.
fn elements<'a, 'i>(n: Node<'a, 'i>) -> Parsed<Vec<Node<'a, 'i>>> {
    no_text(n)?;
    Ok(n.children().filter(|c| c.is_element()).collect())
}

fn show(n: Option<&Node>) -> String {
    n.map_or("nothing".into(), |n| format!("<{}>", n.tag_name().name()))
}

fn expected(want: &'static str, inside: &'static str, found: Option<&Node>) -> OvaXmlError {
    OvaXmlError::Expected { want, inside, found: show(found) }
}

/// A `<value>` element.
fn value(v: Node, depth: usize) -> Parsed<Value> {
    if depth > MAX_DEPTH {
        return Err(OvaXmlError::TooDeep);
    }
    let inner = match v.children().filter(|c| c.is_element()).collect::<Vec<_>>().as_slice() {
        [] => return Ok(Value::Scalar(text(v))), // bare text means a string
        [one] => *one,
        [a, b, ..] => return Err(OvaXmlError::Extra { found: show(Some(b)), after: show(Some(a)) }),
    };
    no_text(v)?;
    match inner.tag_name().name() {
        "struct" => struct_value(inner, depth),
        "array" => array_value(inner, depth),
        t @ ("string" | "int" | "i4" | "i8" | "boolean" | "double" | "dateTime.iso8601" | "base64") => {
            match inner.children().find(|c| c.is_element()) {
                None => Ok(Value::Scalar(text(inner))),
                Some(e) => Err(OvaXmlError::NotText { tag: t.to_string(), found: show(Some(&e)) }),
            }
        }
        t => Err(OvaXmlError::UnknownType(t.to_string())),
    }
}

/// A `<struct>` of `<member><name>…</name><value>…</value></member>`.
fn struct_value(s: Node, depth: usize) -> Parsed<Value> {
    let mut m = Vec::new();
    for member in elements(s)? {
        if member.tag_name().name() != "member" {
            return Err(expected("member", "struct", Some(&member)));
        }
        let (name, v) = match elements(member)?.as_slice() {
            [n, v] if n.tag_name().name() == "name" && v.tag_name().name() == "value" => (*n, *v),
            [n, rest @ ..] if n.tag_name().name() == "name" => {
                return Err(OvaXmlError::NoValue { found: show(rest.first()) });
            }
            e => return Err(expected("name", "member", e.first())),
        };
        if name.children().any(|c| c.is_element()) {
            return Err(OvaXmlError::ElementInName);
        }
        m.push((text(name), value(v, depth + 1)?));
    }
    Ok(Value::Struct(m))
}

/// An `<array><data><value>…</value>…</data></array>`.
fn array_value(a: Node, depth: usize) -> Parsed<Value> {
    let data = match elements(a)?.as_slice() {
        [d] if d.tag_name().name() == "data" => *d,
        e => return Err(expected("data", "array", e.first())),
    };
    let mut out = Vec::new();
    for v in elements(data)? {
        if v.tag_name().name() != "value" {
            return Err(expected("value", "data", Some(&v)));
        }
        out.push(value(v, depth + 1)?);
    }
    Ok(Value::Array(out))
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
    pub fn parse(xml: &str) -> Parsed<Export> {
        Export::from_value(&parse_value(xml)?)
    }

    fn from_value(root: &Value) -> Parsed<Export> {
        let Value::Struct(_) = root else {
            return Err(OvaXmlError::NotStruct);
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
            Some((_, v)) => v.trim().parse().map_err(|_| OvaXmlError::ExportVsn(v.clone()))?,
        };
        let Some(Value::Array(objects)) = root.get("objects") else {
            return Err(OvaXmlError::NoObjects);
        };
        for o in objects {
            ex.add_object(o)?;
        }
        Ok(ex)
    }

    /// Takes in one of the `objects`: a VM, VDI or VBD (other classes are not needed).
    fn add_object(&mut self, o: &Value) -> Parsed<()> {
        let (Some(class), Some(id)) = (o.str("class"), o.str("id")) else {
            return Err(OvaXmlError::NoClassOrId);
        };
        let Some(snap @ Value::Struct(_)) = o.get("snapshot") else {
            return Err(OvaXmlError::NoSnapshot { id: id.to_string(), class: class.to_string() });
        };
        let s = |k: &str| snap.str(k).unwrap_or("").to_string();
        match class {
            "VM" => self.vms.push(Vm {
                id: id.into(),
                uuid: s("uuid"),
                name_label: s("name_label"),
                is_a_snapshot: truthy(snap.str("is_a_snapshot")),
                is_a_template: truthy(snap.str("is_a_template")),
                suspend_vdi: s("suspend_VDI"),
            }),
            "VDI" => {
                let vs = snap.str("virtual_size").ok_or_else(|| OvaXmlError::NoVirtualSize(id.to_string()))?;
                let virtual_size = vs
                    .trim()
                    .parse()
                    .map_err(|_| OvaXmlError::VirtualSize { id: id.to_string(), found: vs.to_string() })?;
                self.vdis.push(Vdi {
                    id: id.into(),
                    uuid: s("uuid"),
                    name_label: s("name_label"),
                    virtual_size,
                    ty: s("type"),
                })
            }
            "VBD" => self.vbds.push(Vbd {
                id: id.into(),
                vm: s("VM"),
                vdi: s("VDI"),
                ty: s("type"),
                empty: truthy(snap.str("empty")),
                userdevice: s("userdevice"),
            }),
            _ => {}
        }
        Ok(())
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

    fn malformed(xml: &str) -> String {
        match Export::parse(xml) {
            Err(OvaXmlError::Appliance) | Ok(_) => panic!("{xml} is not malformed"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn malformed_documents_say_what_is_wrong() {
        assert!(
            malformed("<value><struct><member><name>x</name></member></struct></value>").contains("expected <value>")
        );
        assert!(malformed("<value><struct></struct></value>").contains("objects"));
        assert!(malformed("<value>a &bogus; b</value>").contains("entity"));
        assert!(malformed("<!DOCTYPE x [<!ENTITY a 'b'>]><value/>").contains("DTD"));
        assert!(malformed("<value><struct><member><name>x</name></struct></value>").contains("member"));
        assert!(malformed("<value><struct/>stray</value>").contains("unexpected text \"stray\""));
        let bad = OVA.replace("5368709120", "5 GiB");
        assert!(malformed(&bad).contains("virtual_size \"5 GiB\""));
        let deep = format!("{}<value/>{}", "<value><array><data>".repeat(100), "</data></array></value>".repeat(100));
        assert!(malformed(&deep).contains("deeply"));
        // roxmltree itself does not recurse: a million nested elements are only malformed.
        let wide = format!("{}{}", "<a>".repeat(1 << 20), "</a>".repeat(1 << 20));
        assert!(malformed(&wide).contains("expected <value>"));
    }

    #[test]
    fn entities_and_cdata_decode_and_the_old_layout_is_recognised() {
        assert_eq!(
            parse_value("<value>&#65;&#x42;&lt;<![CDATA[<c>]]></value>").unwrap(),
            Value::Scalar("AB<<c>".into())
        );
        assert!(matches!(
            parse_value("<?xml version='1.0'?><appliance version=\"0.1\"><vm/></appliance>"),
            Err(OvaXmlError::Appliance)
        ));
    }
}
