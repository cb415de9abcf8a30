export type Json =
  | string
  | number
  | boolean
  | null
  | { [key: string]: Json | undefined }
  | Json[]

export type Database = {
  public: {
    Tables: {
      ai_feedback: {
        Row: {
          comment: string | null
          created_at: string
          id: string
          message_id: string
          rating: number
          updated_at: string
          user_id: string
        }
        Insert: {
          comment?: string | null
          created_at?: string
          id?: string
          message_id: string
          rating: number
          updated_at?: string
          user_id?: string
        }
        Update: {
          comment?: string | null
          created_at?: string
          id?: string
          message_id?: string
          rating?: number
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "ai_feedback_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
        ]
      }
      ai_plan_limits: {
        Row: {
          limit_value: number | null
          metric: string
          plan_id: string
          time_window: string
        }
        Insert: {
          limit_value?: number | null
          metric: string
          plan_id: string
          time_window: string
        }
        Update: {
          limit_value?: number | null
          metric?: string
          plan_id?: string
          time_window?: string
        }
        Relationships: [
          {
            foreignKeyName: "ai_plan_limits_plan_id_fkey"
            columns: ["plan_id"]
            isOneToOne: false
            referencedRelation: "ai_plans"
            referencedColumns: ["id"]
          },
        ]
      }
      ai_plans: {
        Row: {
          created_at: string
          description: string
          id: string
          name: string
          uses_own_key: boolean
        }
        Insert: {
          created_at?: string
          description?: string
          id: string
          name: string
          uses_own_key?: boolean
        }
        Update: {
          created_at?: string
          description?: string
          id?: string
          name?: string
          uses_own_key?: boolean
        }
        Relationships: []
      }
      ai_usage_counters: {
        Row: {
          metric: string
          time_window: string
          updated_at: string
          used: number
          user_id: string
          window_start: string
        }
        Insert: {
          metric: string
          time_window: string
          updated_at?: string
          used?: number
          user_id: string
          window_start: string
        }
        Update: {
          metric?: string
          time_window?: string
          updated_at?: string
          used?: number
          user_id?: string
          window_start?: string
        }
        Relationships: []
      }
      assistant_inference_events: {
        Row: {
          attempt: number
          cost_estimate_usd: number | null
          created_at: string
          error_code: string | null
          id: string
          input_tokens: number | null
          latency_ms: number | null
          message_id: string | null
          model: string
          output_tokens: number | null
          prediction_id: string | null
          provider: string
          run_id: string | null
          safety_flags_json: Json
          status: string
          thread_id: string | null
          user_id: string
        }
        Insert: {
          attempt?: number
          cost_estimate_usd?: number | null
          created_at?: string
          error_code?: string | null
          id?: string
          input_tokens?: number | null
          latency_ms?: number | null
          message_id?: string | null
          model: string
          output_tokens?: number | null
          prediction_id?: string | null
          provider: string
          run_id?: string | null
          safety_flags_json?: Json
          status: string
          thread_id?: string | null
          user_id: string
        }
        Update: {
          attempt?: number
          cost_estimate_usd?: number | null
          created_at?: string
          error_code?: string | null
          id?: string
          input_tokens?: number | null
          latency_ms?: number | null
          message_id?: string | null
          model?: string
          output_tokens?: number | null
          prediction_id?: string | null
          provider?: string
          run_id?: string | null
          safety_flags_json?: Json
          status?: string
          thread_id?: string | null
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_inference_events_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_inference_events_run_id_fkey"
            columns: ["run_id"]
            isOneToOne: false
            referencedRelation: "assistant_runs"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_inference_events_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_messages: {
        Row: {
          content: string
          created_at: string
          id: string
          image_url: string | null
          latency_ms: number | null
          metadata_json: Json
          model: string | null
          reply_to: string | null
          role: string
          thread_id: string
          token_count: number | null
          user_id: string
        }
        Insert: {
          content: string
          created_at?: string
          id?: string
          image_url?: string | null
          latency_ms?: number | null
          metadata_json?: Json
          model?: string | null
          reply_to?: string | null
          role: string
          thread_id: string
          token_count?: number | null
          user_id?: string
        }
        Update: {
          content?: string
          created_at?: string
          id?: string
          image_url?: string | null
          latency_ms?: number | null
          metadata_json?: Json
          model?: string | null
          reply_to?: string | null
          role?: string
          thread_id?: string
          token_count?: number | null
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_messages_reply_to_same_thread"
            columns: ["reply_to", "thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id", "thread_id"]
          },
          {
            foreignKeyName: "assistant_messages_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_runs: {
        Row: {
          admitted_at: string | null
          attempts: number
          created_at: string
          finished_at: string | null
          id: string
          last_error: string | null
          last_error_code: string | null
          lease_expires_at: string | null
          lease_owner: string | null
          max_attempts: number
          message_id: string
          next_attempt_at: string
          status: string
          thread_id: string
          updated_at: string
          user_id: string
        }
        Insert: {
          admitted_at?: string | null
          attempts?: number
          created_at?: string
          finished_at?: string | null
          id?: string
          last_error?: string | null
          last_error_code?: string | null
          lease_expires_at?: string | null
          lease_owner?: string | null
          max_attempts?: number
          message_id: string
          next_attempt_at?: string
          status?: string
          thread_id: string
          updated_at?: string
          user_id: string
        }
        Update: {
          admitted_at?: string | null
          attempts?: number
          created_at?: string
          finished_at?: string | null
          id?: string
          last_error?: string | null
          last_error_code?: string | null
          lease_expires_at?: string | null
          lease_owner?: string | null
          max_attempts?: number
          message_id?: string
          next_attempt_at?: string
          status?: string
          thread_id?: string
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "assistant_runs_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: true
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
          {
            foreignKeyName: "assistant_runs_thread_id_fkey"
            columns: ["thread_id"]
            isOneToOne: false
            referencedRelation: "assistant_threads"
            referencedColumns: ["id"]
          },
        ]
      }
      assistant_threads: {
        Row: {
          archived_at: string | null
          created_at: string
          id: string
          last_message_at: string | null
          title: string | null
          updated_at: string
          user_id: string
        }
        Insert: {
          archived_at?: string | null
          created_at?: string
          id?: string
          last_message_at?: string | null
          title?: string | null
          updated_at?: string
          user_id?: string
        }
        Update: {
          archived_at?: string | null
          created_at?: string
          id?: string
          last_message_at?: string | null
          title?: string | null
          updated_at?: string
          user_id?: string
        }
        Relationships: []
      }
      user_ai_settings: {
        Row: {
          created_at: string
          plan_id: string
          preferences: Json
          preferred_chat_model: string | null
          preferred_vision_model: string | null
          updated_at: string
          user_id: string
        }
        Insert: {
          created_at?: string
          plan_id?: string
          preferences?: Json
          preferred_chat_model?: string | null
          preferred_vision_model?: string | null
          updated_at?: string
          user_id: string
        }
        Update: {
          created_at?: string
          plan_id?: string
          preferences?: Json
          preferred_chat_model?: string | null
          preferred_vision_model?: string | null
          updated_at?: string
          user_id?: string
        }
        Relationships: [
          {
            foreignKeyName: "user_ai_settings_plan_id_fkey"
            columns: ["plan_id"]
            isOneToOne: false
            referencedRelation: "ai_plans"
            referencedColumns: ["id"]
          },
        ]
      }
      user_replicate_tokens: {
        Row: {
          ciphertext: string | null
          pending_token: string | null
          token_hint: string
          updated_at: string
          user_id: string
          vault_secret_id: string | null
          version: number
        }
        Insert: {
          ciphertext?: string | null
          pending_token?: string | null
          token_hint: string
          updated_at?: string
          user_id: string
          vault_secret_id?: string | null
          version?: number
        }
        Update: {
          ciphertext?: string | null
          pending_token?: string | null
          token_hint?: string
          updated_at?: string
          user_id?: string
          vault_secret_id?: string | null
          version?: number
        }
        Relationships: []
      }
    }
    Views: {
      ai_feedback_summary: {
        Row: {
          comments: number | null
          last_feedback_at: string | null
          message_id: string | null
          model: string | null
          thumbs_down: number | null
          thumbs_up: number | null
        }
        Relationships: [
          {
            foreignKeyName: "ai_feedback_message_id_fkey"
            columns: ["message_id"]
            isOneToOne: false
            referencedRelation: "assistant_messages"
            referencedColumns: ["id"]
          },
        ]
      }
      ai_usage_daily: {
        Row: {
          blocked: number | null
          cost_usd: number | null
          day: string | null
          failures: number | null
          input_tokens: number | null
          model: string | null
          output_tokens: number | null
          replies: number | null
          user_id: string | null
        }
        Relationships: []
      }
      ai_usage_monthly: {
        Row: {
          blocked: number | null
          cost_usd: number | null
          failures: number | null
          input_tokens: number | null
          model: string | null
          month: string | null
          output_tokens: number | null
          replies: number | null
          user_id: string | null
        }
        Relationships: []
      }
      ai_usage_today: {
        Row: {
          blocked: number | null
          cost_usd: number | null
          failures: number | null
          input_tokens: number | null
          model: string | null
          output_tokens: number | null
          replies: number | null
          user_id: string | null
        }
        Relationships: []
      }
    }
    Functions: {
      admit_request: {
        Args: { p_user_id: string; p_vision?: boolean }
        Returns: Json
      }
      ai_plan_of: { Args: { p_user_id: string }; Returns: string }
      ai_refusal_text: { Args: { p_refusal: Json }; Returns: string }
      ai_usage_add: {
        Args: { p_deltas: Json; p_user_id: string }
        Returns: undefined
      }
      ai_window_end: {
        Args: { p_start: string; p_window: string }
        Returns: string
      }
      ai_window_start: {
        Args: { p_at?: string; p_window: string }
        Returns: string
      }
      assistant_failure_text: {
        Args: { p_error_code: string }
        Returns: string
      }
      assistant_finish_blocked: {
        Args: { p_model: string; p_run_id: string; p_verdict: Json }
        Returns: undefined
      }
      assistant_finish_failed: {
        Args: { p_error: string; p_error_code: string; p_run_id: string }
        Returns: undefined
      }
      assistant_is_client: { Args: never; Returns: boolean }
      claim_runs: {
        Args: {
          p_chat_model?: string
          p_lease_seconds?: number
          p_limit?: number
          p_vision_model?: string
          p_worker: string
        }
        Returns: {
          attempt: number
          content: string
          history: Json
          image_url: string
          max_attempts: number
          message_created_at: string
          message_id: string
          plan_id: string
          run_id: string
          thread_id: string
          user_id: string
          uses_own_key: boolean
        }[]
      }
      complete_run: {
        Args: {
          p_attempt: number
          p_content: string
          p_cost_usd?: number
          p_input_tokens?: number
          p_latency_ms?: number
          p_metadata?: Json
          p_model: string
          p_output_tokens?: number
          p_prediction_id?: string
          p_provider?: string
          p_run_id: string
        }
        Returns: string
      }
      extend_lease: {
        Args: {
          p_attempt: number
          p_lease_seconds?: number
          p_run_id: string
          p_worker: string
        }
        Returns: boolean
      }
      fail_attempt: {
        Args: {
          p_attempt: number
          p_error?: string
          p_error_code: string
          p_latency_ms?: number
          p_model?: string
          p_prediction_id?: string
          p_provider?: string
          p_retry_in_seconds?: number
          p_retryable?: boolean
          p_run_id: string
        }
        Returns: string
      }
      get_replicate_token: { Args: { p_user_id: string }; Returns: Json }
      my_ai_usage: {
        Args: never
        Returns: {
          limit_value: number
          metric: string
          plan_id: string
          remaining: number
          resets_at: string
          time_window: string
          used: number
          window_start: string
        }[]
      }
      my_replicate_token_status: { Args: never; Returns: Json }
      pending_replicate_tokens: {
        Args: { p_limit?: number }
        Returns: {
          token: string
          user_id: string
          version: number
        }[]
      }
      refresh_ai_usage_reports: { Args: never; Returns: undefined }
      release_run: {
        Args: { p_attempt: number; p_run_id: string; p_worker: string }
        Returns: boolean
      }
      run_queue_status: {
        Args: never
        Returns: {
          due_now: number
          in_progress: number
          next_due_at: string
        }[]
      }
      set_my_replicate_token: { Args: { p_token: string }; Returns: Json }
      store_encrypted_replicate_token: {
        Args: { p_ciphertext: string; p_user_id: string; p_version: number }
        Returns: boolean
      }
    }
    Enums: {
      [_ in never]: never
    }
    CompositeTypes: {
      [_ in never]: never
    }
  }
}

type DatabaseWithoutInternals = Omit<Database, "__InternalSupabase">

type DefaultSchema = DatabaseWithoutInternals[Extract<keyof Database, "public">]

export type Tables<
  DefaultSchemaTableNameOrOptions extends
    | keyof (DefaultSchema["Tables"] & DefaultSchema["Views"])
    | { schema: keyof DatabaseWithoutInternals },
  TableName extends DefaultSchemaTableNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof (DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"] &
        DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Views"])
    : never = never,
> = DefaultSchemaTableNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? (DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"] &
      DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Views"])[TableName] extends {
      Row: infer R
    }
    ? R
    : never
  : DefaultSchemaTableNameOrOptions extends keyof (DefaultSchema["Tables"] &
        DefaultSchema["Views"])
    ? (DefaultSchema["Tables"] &
        DefaultSchema["Views"])[DefaultSchemaTableNameOrOptions] extends {
        Row: infer R
      }
      ? R
      : never
    : never

export type TablesInsert<
  DefaultSchemaTableNameOrOptions extends
    | keyof DefaultSchema["Tables"]
    | { schema: keyof DatabaseWithoutInternals },
  TableName extends DefaultSchemaTableNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"]
    : never = never,
> = DefaultSchemaTableNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"][TableName] extends {
      Insert: infer I
    }
    ? I
    : never
  : DefaultSchemaTableNameOrOptions extends keyof DefaultSchema["Tables"]
    ? DefaultSchema["Tables"][DefaultSchemaTableNameOrOptions] extends {
        Insert: infer I
      }
      ? I
      : never
    : never

export type TablesUpdate<
  DefaultSchemaTableNameOrOptions extends
    | keyof DefaultSchema["Tables"]
    | { schema: keyof DatabaseWithoutInternals },
  TableName extends DefaultSchemaTableNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"]
    : never = never,
> = DefaultSchemaTableNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[DefaultSchemaTableNameOrOptions["schema"]]["Tables"][TableName] extends {
      Update: infer U
    }
    ? U
    : never
  : DefaultSchemaTableNameOrOptions extends keyof DefaultSchema["Tables"]
    ? DefaultSchema["Tables"][DefaultSchemaTableNameOrOptions] extends {
        Update: infer U
      }
      ? U
      : never
    : never

export type Enums<
  DefaultSchemaEnumNameOrOptions extends
    | keyof DefaultSchema["Enums"]
    | { schema: keyof DatabaseWithoutInternals },
  EnumName extends DefaultSchemaEnumNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[DefaultSchemaEnumNameOrOptions["schema"]]["Enums"]
    : never = never,
> = DefaultSchemaEnumNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[DefaultSchemaEnumNameOrOptions["schema"]]["Enums"][EnumName]
  : DefaultSchemaEnumNameOrOptions extends keyof DefaultSchema["Enums"]
    ? DefaultSchema["Enums"][DefaultSchemaEnumNameOrOptions]
    : never

export type CompositeTypes<
  PublicCompositeTypeNameOrOptions extends
    | keyof DefaultSchema["CompositeTypes"]
    | { schema: keyof DatabaseWithoutInternals },
  CompositeTypeName extends PublicCompositeTypeNameOrOptions extends {
    schema: keyof DatabaseWithoutInternals
  }
    ? keyof DatabaseWithoutInternals[PublicCompositeTypeNameOrOptions["schema"]]["CompositeTypes"]
    : never = never,
> = PublicCompositeTypeNameOrOptions extends {
  schema: keyof DatabaseWithoutInternals
}
  ? DatabaseWithoutInternals[PublicCompositeTypeNameOrOptions["schema"]]["CompositeTypes"][CompositeTypeName]
  : PublicCompositeTypeNameOrOptions extends keyof DefaultSchema["CompositeTypes"]
    ? DefaultSchema["CompositeTypes"][PublicCompositeTypeNameOrOptions]
    : never

export const Constants = {
  public: {
    Enums: {},
  },
} as const

