// Capability sets as people read them, through libcap (`cap_to_text`), for `fammig inspect`.
internal import CCap

public enum CapabilityText {
    /// libcap's text form of three capability masks, e.g. "=ep cap_net_raw-ep"; the hex masks when
    /// libcap cannot render them.
    public static func describe(effective: UInt64, permitted: UInt64, inheritable: UInt64) -> String {
        let fallback = "eff 0x\(String(effective, radix: 16)) prm 0x\(String(permitted, radix: 16)) inh 0x\(String(inheritable, radix: 16))"
        guard let capabilities = cap_init() else { return fallback }
        defer { cap_free(UnsafeMutableRawPointer(capabilities)) }
        let knownBitCount = min(Int(cap_max_bits()), 64)
        for bit in 0..<knownBitCount {
            var value = [cap_value_t(bit)]
            for (mask, flag) in [(effective, CAP_EFFECTIVE), (permitted, CAP_PERMITTED), (inheritable, CAP_INHERITABLE)]
                where mask & (1 << UInt64(bit)) != 0 {
                guard cap_set_flag(capabilities, flag, 1, &value, CAP_SET) == 0 else { return fallback }
            }
        }
        guard let text = cap_to_text(capabilities, nil) else { return fallback }
        defer { cap_free(UnsafeMutableRawPointer(text)) }
        return String(cString: text)
    }
}
