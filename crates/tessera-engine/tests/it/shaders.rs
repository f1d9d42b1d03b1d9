//! Every kernel family parses and validates with naga, and every entry point the engine
//! dispatches exists with the bindings the engine gives it. No GPU needed.

use tessera_engine::shaders::{Access, Family, Kernel};

/// Validates with the capabilities every WebGPU adapter has: naga counts `unpack2x16float`, which
/// is core WGSL, as `SHADER_FLOAT16_IN_FLOAT32`; nothing else optional (no subgroups, no f16).
fn validate(family: Family) -> naga::Module {
    let source = family.source();
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{family:?} does not parse:\n{}", e.emit_to_string(&source)));
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{family:?} does not validate:\n{}", e.emit_to_string(&source)));
    module
}

#[test]
fn every_family_validates_with_webgpu_core_capabilities() {
    for family in Family::ALL {
        validate(family);
    }
}

#[test]
fn every_kernel_entry_point_matches_its_bindings() {
    for kernel in Kernel::ALL {
        let module = validate(kernel.family());
        let entry = module
            .entry_points
            .iter()
            .find(|e| e.name == kernel.entry_point())
            .unwrap_or_else(|| panic!("{kernel:?}: no entry point {}", kernel.entry_point()));
        assert_eq!(entry.stage, naga::ShaderStage::Compute, "{kernel:?}");
        // Every constant the engine sets is an override the module declares.
        for (name, _) in kernel.constants() {
            assert!(
                module.overrides.iter().any(|(_, o)| o.name.as_deref() == Some(*name)),
                "{kernel:?}: the module has no override {name}"
            );
        }
        // Every binding the engine declares is a global of the module with the same access.
        for &(binding, access) in kernel.bindings() {
            let global = module
                .global_variables
                .iter()
                .map(|(_, g)| g)
                .find(|g| g.binding.as_ref().is_some_and(|b| b.group == 0 && b.binding == binding))
                .unwrap_or_else(|| panic!("{kernel:?}: no global at binding {binding}"));
            let writable = matches!(global.space, naga::AddressSpace::Storage { access } if access.contains(naga::StorageAccess::STORE));
            assert_eq!(writable, access == Access::ReadWrite, "{kernel:?} binding {binding}");
        }
    }
}
