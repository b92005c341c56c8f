//! The struct layouts the process view and the memory maps need, resolved
//! by name from the kernel's BTF, with every resolved field also kept by
//! path (`"task_struct.tasks"`) for code that needs one more later.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::btf::{Btf, Field};
use super::error::ProfileError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskLayout {
    pub size: u64,
    /// `__state` (5.14+) or `state` (older): 4 or 8 bytes, see `size`.
    pub state: Field,
    pub stack: Field,
    pub flags: Field,
    pub tasks: Field,
    pub mm: Field,
    pub active_mm: Field,
    pub pid: Field,
    pub tgid: Field,
    pub real_parent: Field,
    pub parent: Field,
    pub children: Field,
    pub sibling: Field,
    pub group_leader: Field,
    /// `thread_group` (list through the group leader; removed in 6.7).
    pub thread_group: Option<Field>,
    /// `thread_node` (list headed by `signal_struct.thread_head`, 3.14+).
    pub thread_node: Option<Field>,
    pub start_time: Field,
    pub real_cred: Field,
    pub cred: Field,
    /// `char comm[TASK_COMM_LEN]`: `comm.size` is the buffer length.
    pub comm: Field,
    pub signal: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredLayout {
    pub size: u64,
    /// `kuid_t`/`kgid_t` values (`uid.val`).
    pub uid: Field,
    pub gid: Field,
    pub euid: Field,
    pub egid: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalLayout {
    pub size: u64,
    pub nr_threads: Field,
    pub thread_head: Option<Field>,
}

/// How an mm_struct finds its VMAs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum VmaIndex {
    /// 6.1+: `mm_mt`, a maple tree keyed by address (see [`MapleLayout`]).
    MapleTree { mm_mt: Field },
    /// Before 6.1: `mmap`, a list through `vm_area_struct.vm_next`.
    List { mmap: Field, vm_next: Field },
}

/// Where the RSS counters are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum RssCounters {
    /// Up to 6.1: `struct mm_rss_stat { atomic_long_t count[N]; }`, in
    /// pages; tasks may cache up to 64 more each (SPLIT_RSS_COUNTING).
    Atomic { count: Field, elem_size: u64, len: u64 },
    /// 6.2+: `struct percpu_counter rss_stat[N]`; `value` is the
    /// approximate total (`percpu_counter.count`), per-cpu deltas aside.
    Percpu { array: Field, elem_size: u64, len: u64, value: Field },
}

/// Indices into the RSS counters (`enum { MM_FILEPAGES, ... }`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RssIndices {
    pub file: u64,
    pub anon: u64,
    pub swap: u64,
    pub shmem: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmLayout {
    pub size: u64,
    pub pgd: Field,
    pub map_count: Field,
    pub total_vm: Field,
    pub start_code: Field,
    pub end_code: Field,
    pub start_data: Field,
    pub end_data: Field,
    pub start_brk: Field,
    pub brk: Field,
    pub start_stack: Field,
    pub arg_start: Field,
    pub arg_end: Field,
    pub env_start: Field,
    pub env_end: Field,
    pub vmas: VmaIndex,
    pub rss: RssCounters,
    pub rss_index: RssIndices,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmaLayout {
    pub size: u64,
    pub vm_start: Field,
    pub vm_end: Field,
    pub vm_mm: Field,
    pub vm_flags: Field,
    pub vm_pgoff: Field,
    pub vm_file: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileLayout {
    pub size: u64,
    pub f_path: Field,
    /// `f_path.dentry` and `f_path.mnt`, from the start of `struct file`.
    pub path_dentry: Field,
    pub path_mnt: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DentryLayout {
    pub size: u64,
    pub d_parent: Field,
    pub d_name: Field,
    /// `d_name.name` (pointer) and `d_name.len` (u32 inside `hash_len`),
    /// from the start of `struct dentry`.
    pub name_ptr: Field,
    pub name_len: Field,
    pub d_iname: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QstrLayout {
    pub size: u64,
    pub hash_len: Field,
    pub len: Field,
    pub name: Field,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListHeadLayout {
    pub size: u64,
    pub next: Field,
    pub prev: Field,
}

/// `struct mount` (fs/mount.h) around `struct vfsmount`, for full paths.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountLayout {
    pub size: u64,
    pub mnt_parent: Field,
    pub mnt_mountpoint: Field,
    /// The embedded `struct vfsmount` (what `path.mnt` points to).
    pub mnt: Field,
    pub vfsmount_mnt_root: Field,
}

/// One maple node kind: `pivot[]`, `slot[]` and (arange) `gap[]` arrays,
/// offsets from the node start; lengths are `size / 8`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapleNodeKind {
    pub pivot: Field,
    pub slot: Field,
    pub gap: Option<Field>,
    /// `struct maple_metadata` (end, gap), when this kernel has one.
    pub meta: Option<Field>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapleLayout {
    /// `maple_tree.ma_root` (an encoded node pointer) and `ma_flags`.
    pub ma_root: Field,
    pub ma_flags: Field,
    /// `sizeof(struct maple_node)`; node pointers are aligned to it.
    pub node_size: u64,
    pub node_parent: Field,
    pub range_64: MapleNodeKind,
    pub arange_64: MapleNodeKind,
    pub meta_end: Field,
    /// `enum maple_type` values: dense, leaf_64, range_64, arange_64.
    pub type_dense: i64,
    pub type_leaf_64: i64,
    pub type_range_64: i64,
    pub type_arange_64: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layouts {
    pub task_struct: TaskLayout,
    pub cred: CredLayout,
    pub signal_struct: SignalLayout,
    pub mm_struct: MmLayout,
    pub vm_area_struct: VmaLayout,
    pub file: FileLayout,
    pub dentry: DentryLayout,
    pub qstr: QstrLayout,
    pub list_head: ListHeadLayout,
    pub mount: Option<MountLayout>,
    pub maple: Option<MapleLayout>,
    /// Every field resolved, by `"type.member.path"`.
    pub fields: BTreeMap<String, Field>,
    /// Struct sizes by name.
    pub sizes: BTreeMap<String, u64>,
    /// Enumerator values by name (MM_ANONPAGES, maple_leaf_64, ...).
    pub constants: BTreeMap<String, i64>,
}

/// More fields kept by path (optional: a kernel without one just lacks it).
const EXTRA_FIELDS: &[(&str, &str)] = &[
    ("task_struct", "exit_state"),
    ("task_struct", "exit_code"),
    ("task_struct", "prio"),
    ("task_struct", "utime"),
    ("task_struct", "stime"),
    ("task_struct", "nvcsw"),
    ("task_struct", "nivcsw"),
    ("task_struct", "thread"),
    ("task_struct", "thread.sp"),
    ("task_struct", "fs"),
    ("task_struct", "files"),
    ("task_struct", "nsproxy"),
    ("task_struct", "thread_pid"),
    ("mm_struct", "mm_users"),
    ("mm_struct", "mm_count"),
    ("mm_struct", "exe_file"),
    ("mm_struct", "hiwater_rss"),
    ("mm_struct", "hiwater_vm"),
    ("mm_struct", "locked_vm"),
    ("mm_struct", "owner"),
    ("mm_struct", "context.vdso"),
    ("vm_area_struct", "vm_page_prot"),
    ("vm_area_struct", "anon_vma"),
    ("file", "f_inode"),
    ("file", "f_flags"),
    ("file", "f_mode"),
    ("file", "f_pos"),
    ("inode", "i_ino"),
    ("inode", "i_mode"),
    ("inode", "i_size"),
    ("inode", "i_sb"),
    ("super_block", "s_dev"),
    ("dentry", "d_inode"),
    ("fs_struct", "root"),
    ("fs_struct", "pwd"),
    ("files_struct", "fdt"),
    ("fdtable", "max_fds"),
    ("fdtable", "fd"),
    ("signal_struct", "live"),
    ("pid", "numbers"),
    ("upid", "nr"),
    ("pt_regs", "ip"),
    ("pt_regs", "sp"),
    ("pt_regs", "ax"),
    ("pt_regs", "orig_ax"),
];

const CONSTANTS: &[&str] = &[
    "MM_FILEPAGES",
    "MM_ANONPAGES",
    "MM_SWAPENTS",
    "MM_SHMEMPAGES",
    "NR_MM_COUNTERS",
    "maple_dense",
    "maple_leaf_64",
    "maple_range_64",
    "maple_arange_64",
];

/// Resolves fields and records each in the by-path maps; checks that a
/// field lies inside its struct.
struct Resolver<'b, 'a> {
    btf: &'b Btf<'a>,
    fields: BTreeMap<String, Field>,
    sizes: BTreeMap<String, u64>,
    constants: BTreeMap<String, i64>,
}

impl Resolver<'_, '_> {
    fn size(&mut self, ty: &str) -> Result<u64, ProfileError> {
        let size = self.btf.struct_size(ty).ok_or_else(|| ProfileError::missing(format!("struct {ty}"), "no such struct"))?;
        self.sizes.insert(ty.to_string(), size);
        Ok(size)
    }

    fn try_field(&mut self, ty: &str, path: &str) -> Result<Field, String> {
        let f = self.btf.field(ty, path)?;
        let size = self.size(ty).map_err(|e| e.to_string())?;
        if f.end() > size {
            return Err(format!("`{ty}.{path}` ends at {} past the struct's {size} bytes", f.end()));
        }
        self.fields.insert(format!("{ty}.{path}"), f);
        Ok(f)
    }

    fn req(&mut self, ty: &str, path: &str) -> Result<Field, ProfileError> {
        self.try_field(ty, path).map_err(|e| ProfileError::missing(format!("{ty}.{path}"), e))
    }

    /// A field that must be exactly `size` bytes (pointers, list heads).
    fn sized(&mut self, ty: &str, path: &str, size: u64) -> Result<Field, ProfileError> {
        let f = self.req(ty, path)?;
        if f.size != size {
            return Err(ProfileError::missing(format!("{ty}.{path}"), format!("it is {} bytes, expected {size}", f.size)));
        }
        Ok(f)
    }

    fn ptr(&mut self, ty: &str, path: &str) -> Result<Field, ProfileError> {
        self.sized(ty, path, 8)
    }

    fn opt(&mut self, ty: &str, path: &str) -> Option<Field> {
        self.try_field(ty, path).ok()
    }

    /// The first of `paths` that exists (renamed members).
    fn any(&mut self, ty: &str, paths: &[&str]) -> Result<Field, ProfileError> {
        let found = paths.iter().find_map(|p| self.opt(ty, p));
        found.ok_or_else(|| ProfileError::missing(format!("{ty}.{}", paths.join(" or ")), "no such member"))
    }

    fn constant(&mut self, name: &str) -> Option<i64> {
        let v = self.btf.enum_value(name)?;
        self.constants.insert(name.to_string(), v);
        Some(v)
    }

    fn req_constant(&mut self, name: &str) -> Result<i64, ProfileError> {
        self.constant(name).ok_or_else(|| ProfileError::missing(format!("enumerator {name}"), "no such enum value"))
    }
}

impl Layouts {
    pub fn from_btf(btf: &Btf<'_>) -> Result<Self, ProfileError> {
        let mut r = Resolver { btf, fields: BTreeMap::new(), sizes: BTreeMap::new(), constants: BTreeMap::new() };
        let list_head = ListHeadLayout { size: r.size("list_head")?, next: r.ptr("list_head", "next")?, prev: r.ptr("list_head", "prev")? };
        let task_struct = task(&mut r)?;
        let cred = CredLayout {
            size: r.size("cred")?,
            uid: r.sized("cred", "uid.val", 4)?,
            gid: r.sized("cred", "gid.val", 4)?,
            euid: r.sized("cred", "euid.val", 4)?,
            egid: r.sized("cred", "egid.val", 4)?,
        };
        let signal_struct = SignalLayout {
            size: r.size("signal_struct")?,
            nr_threads: r.req("signal_struct", "nr_threads")?,
            thread_head: r.opt("signal_struct", "thread_head"),
        };
        let mm_struct = mm(&mut r)?;
        let vm_area_struct = VmaLayout {
            size: r.size("vm_area_struct")?,
            vm_start: r.sized("vm_area_struct", "vm_start", 8)?,
            vm_end: r.sized("vm_area_struct", "vm_end", 8)?,
            vm_mm: r.ptr("vm_area_struct", "vm_mm")?,
            vm_flags: r.sized("vm_area_struct", "vm_flags", 8)?,
            vm_pgoff: r.sized("vm_area_struct", "vm_pgoff", 8)?,
            vm_file: r.ptr("vm_area_struct", "vm_file")?,
        };
        let file = FileLayout {
            size: r.size("file")?,
            f_path: r.req("file", "f_path")?,
            path_dentry: r.ptr("file", "f_path.dentry")?,
            path_mnt: r.ptr("file", "f_path.mnt")?,
        };
        let dentry = DentryLayout {
            size: r.size("dentry")?,
            d_parent: r.ptr("dentry", "d_parent")?,
            d_name: r.req("dentry", "d_name")?,
            name_ptr: r.ptr("dentry", "d_name.name")?,
            name_len: r.sized("dentry", "d_name.len", 4)?,
            d_iname: r.req("dentry", "d_iname")?,
        };
        let qstr = QstrLayout {
            size: r.size("qstr")?,
            hash_len: r.sized("qstr", "hash_len", 8)?,
            len: r.sized("qstr", "len", 4)?,
            name: r.ptr("qstr", "name")?,
        };
        let mount = mount(&mut r).ok();
        let maple = match mm_struct.vmas {
            VmaIndex::MapleTree { .. } => Some(maple(&mut r)?),
            VmaIndex::List { .. } => None,
        };
        for (ty, path) in EXTRA_FIELDS {
            r.opt(ty, path);
        }
        for name in CONSTANTS {
            r.constant(name);
        }
        Ok(Layouts {
            task_struct,
            cred,
            signal_struct,
            mm_struct,
            vm_area_struct,
            file,
            dentry,
            qstr,
            list_head,
            mount,
            maple,
            fields: r.fields,
            sizes: r.sizes,
            constants: r.constants,
        })
    }

    /// The byte offset of `member_path` in `type_name`, for the fields this
    /// profile resolved (the typed ones above and the extra list).
    pub fn offset_of(&self, type_name: &str, member_path: &str) -> Option<u64> {
        self.field(type_name, member_path).map(|f| f.offset)
    }

    pub fn field(&self, type_name: &str, member_path: &str) -> Option<Field> {
        self.fields.get(&format!("{type_name}.{member_path}")).copied()
    }

    pub fn size_of(&self, type_name: &str) -> Option<u64> {
        self.sizes.get(type_name).copied()
    }

    pub fn constant(&self, name: &str) -> Option<i64> {
        self.constants.get(name).copied()
    }
}

fn task(r: &mut Resolver<'_, '_>) -> Result<TaskLayout, ProfileError> {
    const T: &str = "task_struct";
    let t = TaskLayout {
        size: r.size(T)?,
        state: r.any(T, &["__state", "state"])?,
        stack: r.ptr(T, "stack")?,
        flags: r.req(T, "flags")?,
        tasks: r.sized(T, "tasks", 16)?,
        mm: r.ptr(T, "mm")?,
        active_mm: r.ptr(T, "active_mm")?,
        pid: r.sized(T, "pid", 4)?,
        tgid: r.sized(T, "tgid", 4)?,
        real_parent: r.ptr(T, "real_parent")?,
        parent: r.ptr(T, "parent")?,
        children: r.sized(T, "children", 16)?,
        sibling: r.sized(T, "sibling", 16)?,
        group_leader: r.ptr(T, "group_leader")?,
        thread_group: r.opt(T, "thread_group"),
        thread_node: r.opt(T, "thread_node"),
        start_time: r.sized(T, "start_time", 8)?,
        real_cred: r.ptr(T, "real_cred")?,
        cred: r.ptr(T, "cred")?,
        comm: r.req(T, "comm")?,
        signal: r.ptr(T, "signal")?,
    };
    if t.thread_group.is_none() && t.thread_node.is_none() {
        return Err(ProfileError::missing("task_struct.thread_group or task_struct.thread_node", "no way to list a process's threads"));
    }
    if !(8..=64).contains(&t.comm.size) {
        return Err(ProfileError::missing("task_struct.comm", format!("it is {} bytes, expected TASK_COMM_LEN (16)", t.comm.size)));
    }
    Ok(t)
}

fn mm(r: &mut Resolver<'_, '_>) -> Result<MmLayout, ProfileError> {
    const M: &str = "mm_struct";
    let vmas = if let Some(mm_mt) = r.opt(M, "mm_mt") {
        VmaIndex::MapleTree { mm_mt }
    } else if let Some(mmap) = r.opt(M, "mmap") {
        VmaIndex::List { mmap, vm_next: r.ptr("vm_area_struct", "vm_next")? }
    } else {
        return Err(ProfileError::missing("mm_struct.mm_mt or mm_struct.mmap", "no VMA tree or list"));
    };
    let rss = if let Some(count) = r.opt(M, "rss_stat.count") {
        let elem_size = r.opt(M, "rss_stat.count[0]").map_or(8, |f| f.size);
        RssCounters::Atomic { count, elem_size, len: count.size / elem_size.max(1) }
    } else {
        let array = r.req(M, "rss_stat")?;
        let elem_size = r.req(M, "rss_stat[0]")?.size;
        let value = r.sized("percpu_counter", "count", 8)?;
        RssCounters::Percpu { array, elem_size, len: array.size / elem_size.max(1), value }
    };
    let index = |r: &mut Resolver<'_, '_>, name: &str| r.req_constant(name).map(|v| v as u64);
    let rss_index = RssIndices {
        file: index(r, "MM_FILEPAGES")?,
        anon: index(r, "MM_ANONPAGES")?,
        swap: index(r, "MM_SWAPENTS")?,
        shmem: r.constant("MM_SHMEMPAGES").map(|v| v as u64),
    };
    let word = |r: &mut Resolver<'_, '_>, f: &str| r.sized(M, f, 8);
    Ok(MmLayout {
        size: r.size(M)?,
        pgd: r.ptr(M, "pgd")?,
        map_count: r.sized(M, "map_count", 4)?,
        total_vm: word(r, "total_vm")?,
        start_code: word(r, "start_code")?,
        end_code: word(r, "end_code")?,
        start_data: word(r, "start_data")?,
        end_data: word(r, "end_data")?,
        start_brk: word(r, "start_brk")?,
        brk: word(r, "brk")?,
        start_stack: word(r, "start_stack")?,
        arg_start: word(r, "arg_start")?,
        arg_end: word(r, "arg_end")?,
        env_start: word(r, "env_start")?,
        env_end: word(r, "env_end")?,
        vmas,
        rss,
        rss_index,
    })
}

fn mount(r: &mut Resolver<'_, '_>) -> Result<MountLayout, ProfileError> {
    Ok(MountLayout {
        size: r.size("mount")?,
        mnt_parent: r.ptr("mount", "mnt_parent")?,
        mnt_mountpoint: r.ptr("mount", "mnt_mountpoint")?,
        mnt: r.req("mount", "mnt")?,
        vfsmount_mnt_root: r.ptr("vfsmount", "mnt_root")?,
    })
}

fn maple(r: &mut Resolver<'_, '_>) -> Result<MapleLayout, ProfileError> {
    let kind = |r: &mut Resolver<'_, '_>, ty: &str, gap: bool| -> Result<MapleNodeKind, ProfileError> {
        Ok(MapleNodeKind {
            pivot: r.req(ty, "pivot")?,
            slot: r.req(ty, "slot")?,
            gap: if gap { Some(r.req(ty, "gap")?) } else { None },
            meta: r.opt(ty, "meta"),
        })
    };
    Ok(MapleLayout {
        ma_root: r.ptr("maple_tree", "ma_root")?,
        ma_flags: r.req("maple_tree", "ma_flags")?,
        node_size: r.size("maple_node")?,
        node_parent: r.ptr("maple_node", "parent")?,
        range_64: kind(r, "maple_range_64", false)?,
        arange_64: kind(r, "maple_arange_64", true)?,
        meta_end: r.sized("maple_metadata", "end", 1)?,
        type_dense: r.req_constant("maple_dense")?,
        type_leaf_64: r.req_constant("maple_leaf_64")?,
        type_range_64: r.req_constant("maple_range_64")?,
        type_arange_64: r.req_constant("maple_arange_64")?,
    })
}
